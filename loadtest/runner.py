"""Drives the controller through the asyncio client SDK: closed loop (N concurrent clients, each sending
its next request when the last one finished) or open loop (Poisson arrivals at a rate), bounded by a
request count and/or a duration. Records, per request, when each streamed chunk arrived and how many
tokens it carried, plus the summary's speculation stats."""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from eesd_client import AsyncEesdClient, EesdError


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
    k_histogram: dict[int, int] = field(default_factory=dict)
    drafted_at: list[int] = field(default_factory=list)  # per draft position, from the rounds streamed
    accepted_at: list[int] = field(default_factory=list)
    time_split_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # gRPC status name of a failed request

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def received_tokens(self) -> int:
        return sum(self.chunk_tokens)


async def one_request(client: AsyncEesdClient, record: RequestRecord, prompt, load: Load) -> RequestRecord:
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
        return record
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
    return record


async def run_load(target: str, prompts: Sequence, load: Load) -> tuple[list[RequestRecord], float]:
    """Runs one load against the controller at `target`; returns the records (in issue order) and the wall
    time from the first request sent to the last one finished."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    stop_at = start + load.duration_s if load.duration_s is not None else float("inf")

    def issue() -> RequestRecord | None:
        if (load.requests is not None and len(records) >= load.requests) or time.perf_counter() >= stop_at:
            return None
        records.append(RequestRecord(len(records), time.perf_counter() - start))
        return records[-1]

    async with AsyncEesdClient(target, timeout=load.timeout_s) as client:
        if load.concurrency is not None:

            async def worker() -> None:
                while (record := issue()) is not None:
                    await one_request(client, record, prompts[record.index % len(prompts)], load)

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
                tasks.append(asyncio.create_task(one_request(client, record, prompt, load)))
            await asyncio.gather(*tasks)
    return records, time.perf_counter() - start
