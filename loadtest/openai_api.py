"""The load generator's HTTP side: streams /v1/completions from the controller's OpenAI-compatible API
(controller/http_api.py) and fills the same RequestRecord the SDK side does, so a report has one shape
whichever protocol it measured.

Each request streams (server-sent events) with `stream_options.include_usage`, for the usage and the
speculation statistics of its last chunk, and vLLM's `return_token_ids`, for the tokens of every chunk: one
chunk is one round, as on gRPC, so TTFT, TPOT, ITL and tokens per chunk mean the same. The k histogram,
acceptance by position and round time split exist only in the gRPC summaries; over HTTP the report takes them
from the servers' metrics (--metrics-urls).
"""

from __future__ import annotations

import json
import ssl
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from loadtest.runner import Connection, Load, RequestRecord

COMPLETIONS = "/v1/completions"


def base_url(connection: Connection) -> str:
    """The API's URL: the target as given when it names a scheme, else http(s)://HOST:PORT."""
    if connection.target.startswith(("http://", "https://")):
        return connection.target.rstrip("/")
    return f"{'https' if connection.secure else 'http'}://{connection.target}"


def ssl_context(connection: Connection) -> ssl.SSLContext:
    """The connection's TLS settings (the files the SDK's TlsConfig is read from) for an HTTPS client."""
    context = ssl.create_default_context(cafile=connection.tls_ca_file)  # no CA file: the system's roots
    if connection.tls_cert_file:
        context.load_cert_chain(connection.tls_cert_file, connection.tls_key_file)
    return context


class ServerUnusable(Exception):
    """The run cannot start: the API refused or could not answer its first call."""


class OpenAIClient:
    """One run's HTTP client: an httpx.AsyncClient with the connection's TLS and bearer token."""

    def __init__(self, connection: Connection, timeout_s: float):
        headers = {"Authorization": f"Bearer {connection.auth_token}"} if connection.auth_token else {}
        self.model = connection.model
        # Checked against the certificate instead of the URL's host (TlsConfig.server_name_override on gRPC).
        self.extensions = {"sni_hostname": connection.tls_server_name} if connection.tls_server_name else {}
        self.http = httpx.AsyncClient(
            base_url=base_url(connection),
            headers=headers,
            verify=ssl_context(connection) if connection.secure else True,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),  # one per request in flight
        )

    async def __aenter__(self) -> OpenAIClient:
        if self.model is None:
            try:
                response = await self.http.get("/v1/models", extensions=self.extensions)
            except httpx.TransportError as error:
                raise ServerUnusable(f"GET {self.http.base_url}/v1/models: {error!r}") from error
            if response.is_error:  # a refused token, most often: every request would fail the same way
                raise ServerUnusable(
                    f"GET {self.http.base_url}/v1/models: HTTP {response.status_code} {response.text.strip()[:300]}"
                )
            self.model = response.json()["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def body(self, record: RequestRecord, prompt: str | list[int], load: Load) -> dict[str, Any]:
        """The request the SDK side sends, in the OpenAI API's words (and vLLM's and EESD's extensions)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": load.max_new_tokens,
            "temperature": load.temperature,
            "ignore_eos": not load.stop_on_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if load.temperature > 0:
            body["seed"] = load.seed + record.index
        if load.policy is not None:
            body["policy"] = load.policy
        if load.k_max is not None:
            body["k_max"] = load.k_max
        return body

    async def send(self, record: RequestRecord, prompt: str | list[int], load: Load) -> None:
        start = time.perf_counter()
        try:
            async with self.http.stream(
                "POST", COMPLETIONS, json=self.body(record, prompt, load), extensions=self.extensions
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"HTTP {response.status_code}"
                    return
                tokens: list[int] = []
                summarized = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:  # an error after the stream started is its last event
                        record.error = f"stream error {chunk['error'].get('code') or chunk['error'].get('type')}"
                        return
                    for choice in chunk["choices"]:
                        if choice.get("token_ids"):
                            record.chunk_s.append(time.perf_counter() - start)
                            record.chunk_tokens.append(len(choice["token_ids"]))
                            tokens += choice["token_ids"]
                    if chunk.get("usage"):
                        _summary(record, chunk)
                        summarized = True
        except httpx.HTTPError as error:
            record.error = type(error).__name__
            return
        if not summarized:
            record.error = "stream ended early"  # without its last chunk (the usage)
            return
        record.e2e_s = time.perf_counter() - start
        record.result_tokens = len(tokens)


def _summary(record: RequestRecord, chunk: dict[str, Any]) -> None:
    """The last chunk's usage and speculation statistics (EESD's extension)."""
    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
    record.completion_tokens = chunk["usage"]["completion_tokens"]
    speculation = chunk.get("speculation") or {}
    record.rounds = speculation.get("rounds", 0)
    record.drafted = speculation.get("drafted", 0)
    record.accepted = speculation.get("accepted", 0)
