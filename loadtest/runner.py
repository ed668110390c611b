"""Drives the controller through the asyncio client SDK (gRPC) or its OpenAI-compatible HTTP API
(loadtest/openai_api.py): closed loop (N concurrent clients, each sending its next request when the last one
finished) or open loop (Poisson arrivals at a rate), bounded by a request count and/or a duration. Records,
per request, when each streamed chunk arrived and how many tokens it carried, plus the speculation stats
the response ends with."""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from eesd_client import AsyncEesdClient, EesdError, TlsConfig

from loadtest.openai_api import OpenAIClient

PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class Connection:
    """How the load reaches the controller, with the same options over both protocols. `target`: the gRPC
    HOST:PORT (protocol grpc, through the SDK), or the HTTP API's URL or HOST:PORT (protocol http,
    /v1/completions). TLS as the SDK's TlsConfig names it: the CA to verify the server with (none: the system's
    roots), a client key and certificate for mutual TLS, the name to check when it is not the target's host;
    `auth_token`: sent as `Authorization: Bearer <token>` on both."""

    target: str
    protocol: str = "grpc"
    auth_token: str | None = None
    tls: bool = False  # TLS with the system's roots; implied by any tls_* setting and by an https:// target
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    model: str | None = None  # http: the request's `model` (None: the one GET /v1/models lists)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")

    @property
    def secure(self) -> bool:
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_server_name)
        return self.tls or any(tls_files) or self.target.startswith("https://")

    def tls_config(self) -> TlsConfig | None:
        """The SDK's TLS settings, checked by its rules (a client key goes with its certificate); None: no TLS."""
        if not self.secure:
            return None
        return TlsConfig.from_files(self.tls_ca_file, self.tls_key_file, self.tls_cert_file, self.tls_server_name)


@dataclass(frozen=True)
class Load:
    """One run's load shape and request parameters."""

    concurrency: int | None = None  # closed loop: clients in flight
    rate: float | None = None  # open loop: Poisson arrivals per second
    requests: int | None = None  # stop issuing after this many (None: until the duration ends)
    duration_s: float | None = None  # stop issuing after this long
    max_new_tokens: int = 64
    temperature: float = 0.0
    policy: str | None = None  # None: the server's default; "off": no speculation
    k_max: int | None = None
    stop_on_eos: bool = False  # fixed output lengths make runs comparable
    seed: int = 0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give a request count, a duration or both")
        if self.concurrency is not None and self.concurrency < 1 or self.rate is not None and self.rate <= 0:
            raise ValueError("concurrency must be >= 1 and rate > 0")

    @property
    def name(self) -> str:
        shape = f"c{self.concurrency}" if self.concurrency is not None else f"r{self.rate:g}"
        return f"{shape}-spec-{'off' if self.policy == 'off' else 'on'}"


@dataclass
class RequestRecord:
    index: int
    sent_s: float  # since the start of the run
    prompt_tokens: int = 0
    chunk_s: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk, since sent
    chunk_tokens: list[int] = field(default_factory=list)
    e2e_s: float | None = None  # until the summary arrived (None: failed)
    result_tokens: int = 0  # len(GenerationResult.token_ids)
    completion_tokens: int = 0  # the summary's usage
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    # Only the SDK's summaries and rounds have these (None over HTTP: the server's metrics do).
    k_histogram: dict[int, int] | None = None
    drafted_at: list[int] | None = None  # per draft position, from the rounds streamed
    accepted_at: list[int] | None = None
    time_split_ms: dict[str, float] | None = None
    error: str | None = None  # gRPC status name, or "HTTP <status>", of a failed request

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def received_tokens(self) -> int:
        return sum(self.chunk_tokens)


async def one_request(client: AsyncEesdClient, record: RequestRecord, prompt, load: Load) -> None:
    options = dict(
        max_new_tokens=load.max_new_tokens,
        temperature=load.temperature,
        seed=load.seed + record.index if load.temperature > 0 else None,
        policy=load.policy,
        k_max=load.k_max,
        stop_on_eos=load.stop_on_eos,
    )
    start = time.perf_counter()
    try:
        stream = client.generate(prompt, timeout=load.timeout_s, **options)
        async for chunk in stream:
            if chunk.token_ids:
                record.chunk_s.append(time.perf_counter() - start)
                record.chunk_tokens.append(len(chunk.token_ids))
        result = await stream.result()
    except EesdError as error:
        record.error = error.code.name if error.code is not None else type(error).__name__
        return
    record.e2e_s = time.perf_counter() - start
    stats = result.stats
    record.prompt_tokens = stats.usage.prompt_tokens
    record.result_tokens, record.completion_tokens = len(result.token_ids), stats.usage.completion_tokens
    spec = stats.speculation
    record.rounds, record.drafted, record.accepted = spec.rounds, spec.drafted, spec.accepted
    record.k_histogram = dict(spec.k_histogram)
    depth = max((r.drafted for r in result.rounds), default=0)
    record.drafted_at = [sum(r.drafted > i for r in result.rounds) for i in range(depth)]
    record.accepted_at = [sum(r.accepted > i for r in result.rounds) for i in range(depth)]
    split = stats.time_split
    record.time_split_ms = {
        "draft": split.draft_ms,
        "verify": split.verify_ms,
        "transport": split.transport_ms,
        "controller": split.controller_ms,
        "total": split.total_ms,
    }


class Client(Protocol):
    """What a run sends its requests through, used as an async context manager."""

    async def __aenter__(self) -> "Client": ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def send(self, record: RequestRecord, prompt, load: Load) -> None:
        """Sends one request and fills its record."""


class SdkClient:
    """The gRPC side: the SDK's AsyncEesdClient with the connection's TLS and token."""

    def __init__(self, connection: Connection, timeout_s: float):
        tls = connection.tls_config()
        self.client = AsyncEesdClient(connection.target, tls=tls, auth_token=connection.auth_token, timeout=timeout_s)

    async def __aenter__(self) -> "SdkClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def send(self, record: RequestRecord, prompt, load: Load) -> None:
        await one_request(self.client, record, prompt, load)


def client_of(connection: Connection, timeout_s: float) -> Client:
    return OpenAIClient(connection, timeout_s) if connection.protocol == "http" else SdkClient(connection, timeout_s)


async def run_load(connection: Connection, prompts: Sequence, load: Load) -> tuple[list[RequestRecord], float]:
    """Runs one load against the controller `connection` names; returns the records (in issue order) and the
    wall time from the first request sent to the last one finished."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    stop_at = start + load.duration_s if load.duration_s is not None else float("inf")

    def issue() -> RequestRecord | None:
        if (load.requests is not None and len(records) >= load.requests) or time.perf_counter() >= stop_at:
            return None
        records.append(RequestRecord(len(records), time.perf_counter() - start))
        return records[-1]

    async with client_of(connection, load.timeout_s) as client:
        if load.concurrency is not None:

            async def worker() -> None:
                while (record := issue()) is not None:
                    await client.send(record, prompts[record.index % len(prompts)], load)

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            rng, tasks = random.Random(load.seed), []
            next_at = start
            while True:
                next_at += rng.expovariate(load.rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if (record := issue()) is None:
                    break
                prompt = prompts[record.index % len(prompts)]
                tasks.append(asyncio.create_task(client.send(record, prompt, load)))
            await asyncio.gather(*tasks)
    return records, time.perf_counter() - start
