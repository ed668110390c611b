"""Many sessions' model work in shared forward passes (continuous batching, docs/architecture.md §8.6).

Every model operation of a node (prefill, verify, propose, lookahead) is written once, as a *job*: a
generator that yields the `Row` it wants fed next, receives that row's logits, and returns its result.
A `Batch` steps all of its jobs together, one `forward_batch` per step with each job's row in it; a job
that finishes or fails leaves at once, and a new one joins at the next step. Run alone (`run_job`), a job
is the plain single-session call, so batching cannot change what a session computes: each job keeps its
own cache, sampling parameters and random generator (seeded from (seed, round), never from its place in
the batch).
"""

import time
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from eesd.decoder_stack import DecoderStack, Row
from eesd.kv_cache import KVPool

T = TypeVar("T")
Job = Generator[Row, torch.Tensor, T]  # yields rows to feed, is sent their logits, returns its result


@dataclass(frozen=True)
class Finished:
    """A job's end: its result, or the exception it raised (which fails that job alone)."""

    key: Hashable
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class PassStats:
    rows: int
    tokens: int
    seconds: float


class Batch:
    """Jobs in flight on one stack. Not thread-safe: one compute thread adds and steps."""

    def __init__(self, stack: DecoderStack, on_pass: Callable[[PassStats], None] = lambda stats: None):
        self.stack, self.on_pass = stack, on_pass
        self._running: dict[Hashable, tuple[Job, Row]] = {}

    def __len__(self) -> int:
        return len(self._running)

    @property
    def tokens(self) -> int:
        """Tokens the next pass will feed for the jobs already running."""
        return sum(len(row.input_ids) for _, row in self._running.values())

    def add(self, key: Hashable, job: Job) -> Finished | None:
        """Starts `job` (it validates and takes its cache here); it runs from the next step, or has finished
        already (a job that needs no pass, or refused its request)."""
        if key in self._running:
            raise ValueError(f"job {key!r} is already running")
        return self._advance(key, job, lambda: next(job))

    def step(self) -> list[Finished]:
        """One forward pass over every running job's row; returns the jobs that finished in it."""
        if not self._running:
            return []
        keys = list(self._running)
        rows = [self._running[key][1] for key in keys]
        start = time.perf_counter()
        logits = self.stack.forward_batch(rows)
        _synchronize(logits[0].device)
        self.on_pass(PassStats(len(rows), sum(len(row.input_ids) for row in rows), time.perf_counter() - start))
        finished = []
        for key, row_logits in zip(keys, logits, strict=True):
            job = self._running.pop(key)[0]
            if (done := self._advance(key, job, lambda job=job, x=row_logits: job.send(x))) is not None:
                finished.append(done)
        return finished

    def _advance(self, key: Hashable, job: Job, resume: Callable[[], Row]) -> Finished | None:
        try:
            self._running[key] = (job, resume())
        except StopIteration as stop:
            return Finished(key, result=stop.value)
        except Exception as error:  # one job's failure is its own: the batch goes on
            return Finished(key, error=error)
        return None


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work. A pass on a GPU returns once its kernels are queued, so its time,
    which the load-aware rule fits pass costs to, is only taken after this; the jobs would wait for the
    logits right after anyway."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_job(sessions: KVPool, key: str, base_length: int, token_ids: list[int]) -> Job[int]:
    """Brings a session's cache to base_length + len(token_ids) (a new session, or one that lags); returns
    the length its cache then covers."""
    cache = sessions.at_base(key, base_length, token_ids)
    yield Row(token_ids, cache, len(token_ids) - 1)
    return cache.length


def run_job(stack: DecoderStack, job: Job[T]) -> T:
    """A job alone: the single-session call."""
    batch = Batch(stack)
    done = batch.add(0, job)
    while done is None:
        (done,) = batch.step() or (None,)
    if done.error is not None:
        raise done.error
    return done.result


def run_jobs(
    stack: DecoderStack, jobs: list[Job], on_pass: Callable[[PassStats], None] = lambda stats: None
) -> list[Finished]:
    """All jobs together until each has finished, in the order given (in-process batching)."""
    batch, finished = Batch(stack, on_pass), {}
    for key, job in enumerate(jobs):
        if (done := batch.add(key, job)) is not None:
            finished[key] = done
    while len(batch):
        finished.update((done.key, done) for done in batch.step())
    return [finished[key] for key in range(len(jobs))]
