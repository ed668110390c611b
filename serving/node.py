"""What the drafter and verifier services share: one model, one compute thread, continuous batching.

Model work is a job (eesd.batch): the compute thread keeps a `Batch` of running jobs and steps it, one
forward pass over every running session per step. Jobs submitted while a pass runs join the next one
(up to `max_batch` sessions and `max_pass_tokens` new tokens per pass); a lone job runs at once, with no
fixed wait. Plain calls (loading the model, closing a session: anything that touches the KV pool outside
a job) run on the same thread between passes, so the pool never changes under a running pass. The event
loop only submits and awaits, so it keeps answering health checks and stream messages meanwhile.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from eesd.batch import Batch, Finished, Job, PassStats, prefill_job
from eesd.drafter import Drafter
from eesd.errors import Unavailable
from eesd.load import NodeLoad, PassTimer
from eesd.params import check_token_ids
from eesd.verifier import Verifier
from serving.config import ModelNodeConfig
from serving.metrics import node_metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Model = Drafter | Verifier


@dataclass
class _Work:
    """A job to join a pass, or a call to run between passes; resolves `future` on the event loop."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None  # None once the caller stopped waiting
    op: str
    key: str = ""  # a job's session (eesd.params.session_key): one job per session runs at a time
    job: Job | None = None
    call: Callable[[], Any] | None = None
    tokens: int = 0  # new tokens of the job's first row, for the per-pass token cap
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            future = self.future
            if future is None or future.done():  # the caller went away
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class ModelNode:
    """Created before the model loads, so the server can answer health checks (NOT_SERVING) meanwhile."""

    def __init__(
        self,
        node_id: str,
        role: str = "model",
        max_batch: int = 64,
        max_pass_tokens: int = 2048,
        session_idle_s: float = 600.0,
        session_evict_s: float = 10.0,
    ):
        self.node_id, self.max_batch, self.max_pass_tokens = node_id, max_batch, max_pass_tokens
        self.session_idle_s = session_idle_s  # 0: sessions never expire
        self.session_evict_s = session_evict_s  # unused this long: evictable for a new session (eesd.kv_cache)
        self._next_sweep = time.monotonic() + session_idle_s
        self._model: Model | None = None
        self._inbox: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._waiting: deque[_Work] = deque()  # jobs not admitted yet (batch or token cap reached)
        self._running: dict[int, _Work] = {}
        self.queued = 0  # jobs and calls submitted and not finished
        self._busy_since: float | None = None  # when the pass or call on the compute thread started
        self.passes = PassTimer()
        self.metrics = node_metrics(role)
        self.metrics.watch_sessions(lambda: len(self._model.sessions) if self._model is not None else 0)
        self.metrics.watch_queue(lambda: self.queued)
        self.metrics.watch_waiting(lambda: len(self._waiting))
        self.metrics.watch_kv_usage(lambda: self._model.sessions.usage() if self._model is not None else 0.0)
        self._thread = threading.Thread(target=self._serve, name=f"model-{role}", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: ModelNodeConfig, role: str) -> "ModelNode":
        node_id = config.node_id or f"{config.host}:{config.port}"
        return cls(
            node_id, role, config.max_batch, config.max_pass_tokens, config.session_idle_s, config.session_evict_s
        )

    @property
    def model(self) -> Model:
        if self._model is None:
            raise Unavailable(f"{self.node_id} is still loading its model")
        return self._model

    def load_now(self) -> NodeLoad | None:
        """This node's pass cost and rows per pass, fitted on its recent passes (eesd.load)."""
        return self.passes.load()

    async def load(self, factory: Callable[[], Model]) -> None:
        """Loads the model off the event loop, then runs one real forward pass: the node reports SERVING
        only once the model computes."""
        model = await self.run(factory, op="load")
        await self.run(lambda: model.stack([0, 1], model.stack.new_cache(capacity=4)), op="load")
        model.sessions.evict_idle_s, model.sessions.in_use = self.session_evict_s, self._in_use
        self._model = model

    async def run(self, fn: Callable[..., T], *args, op: str = "") -> T:
        """Runs `fn(*args)` on the compute thread between passes; `op` names it in metrics."""
        work = _Work(asyncio.get_running_loop(), _future(), op or fn.__name__, call=lambda: fn(*args))
        return await self._submit(work)

    async def run_job(self, job: Job[T], op: str, key: str, tokens: int = 1) -> T:
        """Runs `job` in the node's passes, batched with other sessions' jobs; a job waits while another job
        of its session (`key`) runs (they would share a cache). `tokens` is the size of its first row (for
        the per-pass token cap)."""
        work = _Work(asyncio.get_running_loop(), _future(), op, key, job=job, tokens=tokens)
        return await self._submit(work)

    async def _submit(self, work: _Work) -> Any:
        self.queued += 1
        try:
            self._inbox.put(work)
            return await work.future
        finally:
            self.queued -= 1
            # The future holds a failed call's error, whose traceback holds this frame, which holds the
            # work: a cycle that would keep the caller's request alive until the cyclic GC runs.
            work.future = None

    def stalled(self, bound_s: float) -> bool:
        """True while one pass or call has been running for more than `bound_s` seconds: the compute thread
        makes no progress, which the liveness probe must see."""
        since = self._busy_since
        return since is not None and time.monotonic() - since > bound_s

    def cache_length(self, key: str) -> int:
        """How many tokens the session's cache covers (0 when the node does not hold it)."""
        try:
            return self.model.sessions.get(key).length
        except LookupError:
            return 0

    async def open_session(self, key: str, reserve_tokens: int | None = None) -> int:
        """Idempotent: an open session keeps its cache. A new one reserves `reserve_tokens` KV positions
        (default: the model's context)."""

        def open_or_keep() -> int:
            sessions = self.model.sessions
            try:
                return sessions.get(key).length
            except LookupError:
                return sessions.open(key, reserve_tokens).length

        return await self.run(open_or_keep, op="open")

    async def prefill(self, key: str, base_length: int, token_ids: list[int]) -> int:
        check_token_ids("token_ids", token_ids, self.model.config.vocab_size)
        self.metrics.prefill(len(token_ids))
        job = prefill_job(self.model.sessions, key, base_length, token_ids)
        return await self.run_job(job, "prefill", key, len(token_ids))

    async def close_session(self, key: str) -> None:
        await self.run(self.model.sessions.close, key, op="close")

    def shutdown(self) -> None:
        self._inbox.put(None)

    # -- the compute thread ----------------------------------------------------------------------------

    def _serve(self) -> None:
        batch: Batch | None = None
        while True:
            idle = not self._waiting and (batch is None or not len(batch))
            if not self._take(block=idle, timeout=self._until_sweep() if idle else None):
                return
            if self._model is None:
                continue  # only calls (the load) run before there is a model
            self._sweep()
            if batch is None:
                batch = Batch(self._model.stack, self._on_pass)
            self._admit(batch)
            self._busy_since = time.monotonic()
            try:
                finished = batch.step()
            except Exception as error:  # the pass itself failed: every job in it fails, the node goes on
                log.exception("a forward pass of %d sessions failed", len(batch))
                finished = [Finished(key, error=error) for key in self._running]
                batch = None
            finally:
                self._busy_since = None
            for done in finished:
                self._finish(done)

    def _take(self, block: bool, timeout: float | None = None) -> bool:
        """Moves submitted work to the waiting jobs and runs submitted calls; False once shut down."""
        while True:
            try:
                work = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            block = False
            if work is None:
                return False
            if work.call is not None:
                self._call(work)
            else:
                self._waiting.append(work)

    def _call(self, work: _Work) -> None:
        work.started = time.perf_counter()
        self.metrics.queue_wait(work.started - work.submitted)
        self._busy_since = time.monotonic()
        try:
            result = work.call()
        except Exception as error:  # the caller gets it
            self.metrics.work_done(work.op, time.perf_counter() - work.started, error)
            work.resolve(error=error)
            return
        finally:
            self._busy_since = None
        self.metrics.work_done(work.op, time.perf_counter() - work.started)
        work.resolve(result)

    def _in_use(self, key: str) -> bool:
        """Whether a job of the session waits or runs (compute thread: the pool asks while opening one)."""
        return any(work.key == key for work in (*self._waiting, *self._running.values()))

    def _until_sweep(self) -> float | None:
        return max(0.0, self._next_sweep - time.monotonic()) if self.session_idle_s else None

    def _sweep(self) -> None:
        """Between passes: closes sessions idle for session_idle_s (checked every tenth of that)."""
        if not self.session_idle_s or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.session_idle_s / 10
        # A session in the running batch fed tokens in the last pass, so it is never among them.
        closed = self._model.sessions.close_idle(self.session_idle_s)
        if closed:
            log.info("closed %d sessions idle for %.0f s", len(closed), self.session_idle_s)

    def _admit(self, batch: Batch) -> None:
        """Waiting jobs join in order while the pass has room (a lone job always fits); a job whose session
        already has one running waits for it, without holding up other sessions behind it."""
        tokens, busy = batch.tokens, {work.key for work in self._running.values()}
        for work in list(self._waiting):
            if len(batch) >= self.max_batch or (len(batch) and tokens + work.tokens > self.max_pass_tokens):
                return
            if work.key in busy:
                continue
            self._waiting.remove(work)
            busy.add(work.key)
            work.started = time.perf_counter()
            self.metrics.queue_wait(work.started - work.submitted)
            key = id(work)
            self._running[key] = work
            tokens += work.tokens
            if (done := batch.add(key, work.job)) is not None:
                self._finish(done)

    def _finish(self, done: Finished) -> None:
        work = self._running.pop(done.key)
        self.metrics.work_done(work.op, time.perf_counter() - work.started, done.error)
        work.resolve(done.result, done.error)

    def _on_pass(self, stats: PassStats) -> None:
        self.passes.record(stats.tokens, stats.rows, stats.seconds)
        self.metrics.forward_pass(stats.rows, stats.tokens, stats.seconds)


def _future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()
