#!/usr/bin/env bash
# Regenerates the test-only CA, server and client certificates (valid 100 years). Never use them elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
days=36500
openssl req -x509 -newkey rsa:2048 -nodes -days $days -subj "/CN=eesd-test-ca" -keyout ca.key -out ca.pem
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days $days -extfile server.ext -out server.pem
openssl req -newkey rsa:2048 -nodes -subj "/CN=eesd-test-client" -keyout client.key -out client.csr
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days $days -out client.pem
rm -f server.csr client.csr server.ext ca.srl ca.key
