"""What the drafter and verifier services share: one model, one compute thread, per-session caches.

Model calls run on a single worker thread so the event loop keeps answering health checks and stream
messages while a forward pass runs, and passes on one model never overlap.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from eesd.drafter import Drafter
from eesd.errors import Unavailable
from eesd.params import check_token_ids
from eesd.verifier import Verifier
from serving.metrics import node_metrics

T = TypeVar("T")


class ModelNode:
    """Created before the model loads, so the server can answer health checks (NOT_SERVING) meanwhile."""

    def __init__(self, node_id: str, role: str = "model"):
        self.node_id = node_id
        self._model: Drafter | Verifier | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.queued = 0  # model calls waiting for or running on the compute thread
        self.metrics = node_metrics(role)
        self.metrics.watch_sessions(lambda: len(self._model.sessions) if self._model is not None else 0)
        self.metrics.watch_queue(lambda: self.queued)

    @property
    def model(self) -> Drafter | Verifier:
        if self._model is None:
            raise Unavailable(f"{self.node_id} is still loading its model")
        return self._model

    async def load(self, factory: Callable[[], Drafter | Verifier]) -> None:
        """Loads the model off the event loop, then runs one real forward pass: the node reports SERVING
        only once the model computes."""
        model = await self.run(factory)
        await self.run(lambda: model.stack([0, 1], model.stack.new_cache(capacity=4)))
        self._model = model

    async def run(self, fn: Callable[..., T], *args, op: str = "") -> T:
        """Runs `fn(*args)` on the compute thread; `op` names it in metrics (default: its name)."""
        self.queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.metrics.timed(fn, op), *args)
        finally:
            self.queued -= 1

    def cache_length(self, session_id: str) -> int:
        """How many tokens the session's cache covers (0 when the node does not hold it)."""
        try:
            return self.model.sessions.get(session_id).length
        except LookupError:
            return 0

    def open_session(self, session_id: str) -> int:
        """Idempotent: an open session keeps its cache."""
        try:
            return self.model.sessions.get(session_id).length
        except LookupError:
            return self.model.sessions.open(session_id).length

    async def prefill(self, session_id: str, base_length: int, token_ids: list[int]) -> int:
        check_token_ids("token_ids", token_ids, self.model.config.vocab_size)
        self.metrics.prefill(len(token_ids))
        cache = self.model.sessions.at_base(session_id, base_length, token_ids)
        await self.run(self.model.stack, token_ids, cache, len(token_ids) - 1)
        return cache.length

    def close_session(self, session_id: str) -> None:
        self.model.sessions.close(session_id)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
