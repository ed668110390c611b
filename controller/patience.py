"""How the controller's round loop rides out state-store outages (docs/architecture.md §8.1).

A round that cannot reach the store waits for it: `StorePatience.call` retries the store call with
jittered exponential backoff for `wait_s` seconds (each try cut at the time left), so a Redis restart, a
pause or a Sentinel failover shorter than that costs a session latency, not its life. Past the budget the
call raises `StoreUnavailable` (UNAVAILABLE), the session stops, and what was committed stays.

Redis that comes back without the session (a restart without persistence) or behind it (an AOF that lost
its last second, a failover to a replica that lagged) is repaired from the controller, which holds every
running session's state: a call given the session's `record` writes it back (`restore_session`) and
tries again, instead of failing with NOT_FOUND.

The end of a session (finished, cancelled, failed) is written at the point the client saw (`at`), which
also takes back a commit whose reply was lost (see `controller/state_store.py`, `_END`). When the store
is down then, the write is retried in the background until the store answers (`end_later`, bounded by
`end_retry_s`, the records' TTL: past it an unwritten end no longer matters), so a session that failed
during an outage does not stay ``active`` in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controller.state_store import SessionRecord, StaleRecord, StateStore
from eesd.errors import Aborted, FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

RESTORES_PER_CALL = 3  # a record that keeps vanishing right after it is written back is not ours to chase
MIN_TRY_S = 1.0  # every try gets this long at least, even at the end of the budget


class StoreUnavailable(Unavailable):
    """The state store did not answer within the controller's budget (`store_wait_s`)."""

    def __init__(self, message: str):
        super().__init__(message, peer="store")


class StorePatience:
    def __init__(
        self,
        store: StateStore,
        wait_s: float = 30.0,
        end_retry_s: float = 3600.0,
        first_pause_s: float = 0.05,
        max_pause_s: float = 1.0,
    ):
        self.store, self.wait_s, self.end_retry_s = store, wait_s, end_retry_s
        self.first_pause_s, self.max_pause_s = first_pause_s, max_pause_s
        self._pending: dict[asyncio.Task, str] = {}  # end writes waiting for the store -> session id

    async def call(
        self,
        op: Callable[[], Awaitable[T]],
        record: Callable[[], SessionRecord] | None = None,
        wait_s: float | None = None,
    ) -> T:
        """`await op()`, waiting out an unreachable store for `wait_s` (default: the budget); with `record`
        (the session's state as this controller holds it), a store that lost the session gets it back."""
        wait_s = self.wait_s if wait_s is None else wait_s
        start = time.monotonic()
        deadline, pause, restores = start + wait_s, self.first_pause_s, 0
        restore: SessionRecord | None = None
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if last is not None and left <= 0:
                raise StoreUnavailable(f"state store unreachable for {wait_s:g} s: {last}") from last
            try:
                if restore is not None:
                    if await asyncio.wait_for(self.store.restore_session(restore), max(left, MIN_TRY_S)):
                        log.warning(
                            "session %s: the state store had lost it (or its last rounds); written back at "
                            "round %d, %d tokens",
                            restore.session_id[:64],
                            restore.next_round,
                            len(restore.committed),
                        )
                    restore = None
                result = await asyncio.wait_for(op(), max(left, MIN_TRY_S))
            except (Unavailable, TimeoutError) as error:
                last = error if isinstance(error, Unavailable) else Unavailable("the state store did not answer")
                sleep = min(pause * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(sleep)
                pause = min(2 * pause, self.max_pause_s)
                continue
            except (NotFound, StaleRecord):
                if record is None or restores >= RESTORES_PER_CALL:
                    raise
                restores += 1
                restore = record()
                continue
            if last is not None:
                log.info("state store answered again after %.1f s", time.monotonic() - start)
            return result

    async def end(self, session_id: str, write: Callable[[], Awaitable[None]], at: SessionRecord) -> None:
        """Writes a session's end now if the store answers within a second, else in the background."""
        try:
            await self.call(write, lambda: at, wait_s=min(self.wait_s, 1.0))
        except StoreUnavailable:
            self.end_later(session_id, write, at)
        except (FailedPrecondition, Aborted) as error:  # another controller drives it now: not ours to write
            log.warning("session %s: end not written: %s", session_id[:64], error)

    def end_later(self, session_id: str, write: Callable[[], Awaitable[None]], at: SessionRecord) -> None:
        """Writes a session's end in the background, retrying until the store answers (at most end_retry_s)."""
        task = asyncio.ensure_future(self._end_when_back(session_id, write, at))
        self._pending[task] = session_id
        task.add_done_callback(self._pending.pop)

    async def _end_when_back(self, session_id: str, write: Callable[[], Awaitable[None]], at: SessionRecord) -> None:
        try:
            await self.call(write, lambda: at, wait_s=self.end_retry_s)
            log.info("session %s: its end is written now that the state store answers", session_id[:64])
        except (StoreUnavailable, FailedPrecondition, Aborted, NotFound) as error:
            # Aborted: a controller that was stopped (hung) past its client's patience finds the session
            # resumed elsewhere, under a newer epoch; the end is that controller's to write.
            log.warning("session %s: its end could not be written: %s", session_id[:64], error)

    @property
    def pending_ends(self) -> list[str]:
        """Sessions whose end waits for the store."""
        return list(self._pending.values())

    async def aclose(self, grace_s: float = 2.0) -> None:
        """At shutdown: gives the end writes still waiting `grace_s`, then drops them (their records stay
        active until their TTL, the last resort when the controller goes before the store comes back)."""
        if not self._pending:
            return
        _, pending = await asyncio.wait(list(self._pending), timeout=grace_s)
        if pending:
            log.warning(
                "shutting down with %d session end(s) unwritten (the store is unreachable): %s",
                len(pending),
                ", ".join(self._pending.get(t, "?")[:64] for t in pending),
            )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
