"""Test certificates, made when a test runs (the `cryptography` package): a CA, a certificate every service
of a stack serves and presents as a client, one more client of the same CA, and a client of another CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_NAME = "eesd-internal"  # the name every service's certificate carries (nodes are called by IP)


@dataclass(frozen=True)
class Pki:
    ca: Path
    service_cert: Path  # SANs: eesd-internal, localhost, 127.0.0.1
    service_key: Path
    client_cert: Path  # CN eesd-client, signed by the CA
    client_key: Path
    foreign_cert: Path  # CN eesd-internal, signed by another CA
    foreign_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_ca(common_name: str):
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert, ca_key, common_name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()):
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca("eesd-test-ca")
    service, service_key = issue(ca_cert, ca_key, SERVICE_NAME, (SERVICE_NAME, "localhost"), ("127.0.0.1",))
    client, client_key = issue(ca_cert, ca_key, "eesd-client")
    other_cert, other_key = make_ca("another-ca")
    foreign, foreign_key = issue(other_cert, other_key, SERVICE_NAME, (SERVICE_NAME,))
    return Pki(
        _write_cert(ca_cert, directory / "ca.pem"),
        _write_cert(service, directory / "service.pem"),
        _write_key(service_key, directory / "service.key"),
        _write_cert(client, directory / "client.pem"),
        _write_key(client_key, directory / "client.key"),
        _write_cert(foreign, directory / "foreign.pem"),
        _write_key(foreign_key, directory / "foreign.key"),
    )
