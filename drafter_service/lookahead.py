"""Pipelined drafting on a drafter node (DESIGN §4): round r+1 is drafted while round r is verified.

One lookahead per session, started once a block has gone to the verifier, in two steps on the model
thread:
  1. feed the block's last draft and guess round r+1's request. This always runs, so that whenever the
     verifier accepts the whole block the drafter's cache covers it and the length it reports (hence
     the next round's base) never depends on timing;
  2. propose the guessed request, only while no other model call waits: under load the node drafts
     what the controller asks and nothing ahead. It stops as soon as the guess fails or work arrives.
The next Draft takes the block when its request is exactly the guessed one; anything else drops it.
"""

import asyncio
import logging
import threading
from dataclasses import dataclass

from eesd.drafter import DraftStopped
from eesd.errors import EesdError
from eesd.rounds import DraftBlock, DraftRequest
from serving.node import ModelNode

log = logging.getLogger(__name__)


@dataclass
class _Lookahead:
    guess: asyncio.Future  # of step 1: the guessed DraftRequest of round r+1, or None (no room)
    ahead: asyncio.Task  # of step 2: the block drafted for the guess, or None (skipped or stopped)
    stopped: threading.Event  # read by the model thread between drafts


class Lookaheads:
    def __init__(self, node: ModelNode, enabled: bool = True):
        self.node, self.enabled = node, enabled
        self._sessions: dict[str, _Lookahead] = {}

    def start(self, request: DraftRequest, block: DraftBlock) -> None:
        """Begins drafting round r+1 of `request`'s session; `block` is round r's, just sent out."""
        if not self.enabled or not block.tokens:
            return
        guess = asyncio.ensure_future(self.node.run(self.node.model.lookahead, request, block))
        stopped = threading.Event()
        self._sessions[request.session_id] = _Lookahead(
            guess, asyncio.create_task(self._ahead(guess, stopped)), stopped
        )

    async def _ahead(self, guess: asyncio.Future, stopped: threading.Event) -> DraftBlock | None:
        try:
            request = await guess
            if request is None or stopped.is_set() or self.node.queued:
                return None
            # Stop between drafts once the guess failed or another call waits: other sessions go first.
            busy = lambda: stopped.is_set() or self.node.queued > 1  # noqa: E731
            return await self.node.run(self.node.model.propose, request, busy, op="propose_ahead")
        except (DraftStopped, EesdError) as error:  # the session moved on or closed: nothing to keep
            log.debug("lookahead dropped: %r", error)
            return None

    async def settle(self, session_id: str, accepted_all: bool, next_token: int) -> bool:
        """Round r's verdict is in: keeps the lookahead only if its guess came true. True when the cache
        covers the whole block (the verifier accepted all of it and step 1 fed the last draft)."""
        lookahead = self._sessions.get(session_id)
        if lookahead is None:
            return False
        if not accepted_all:
            lookahead.stopped.set()
            return False
        try:
            request = await asyncio.shield(lookahead.guess)
        except (DraftStopped, EesdError):
            return False
        if request is None or request.pending != [next_token]:
            lookahead.stopped.set()
        return True

    async def take(self, request: DraftRequest) -> DraftBlock | None:
        """The block drafted ahead for exactly `request`, or None. Either way the session's lookahead is
        over when this returns, so no stale work touches its cache afterwards."""
        lookahead = self._sessions.pop(request.session_id, None)
        if lookahead is None:
            return None
        guess = lookahead.guess
        guessed = guess.done() and not guess.cancelled() and not guess.exception() and guess.result() == request
        if not guessed:
            lookahead.stopped.set()
        block = await asyncio.shield(lookahead.ahead)
        # dropped: the guess failed; skipped: it held but the node was busy (or got busy) meanwhile.
        self.node.metrics.lookahead("dropped" if not guessed else "skipped" if block is None else "used")
        return block if guessed else None

    async def drop(self, session_id: str) -> None:
        """Ends the session's lookahead before something else (prefill, close) touches its cache."""
        lookahead = self._sessions.pop(session_id, None)
        if lookahead is not None:
            lookahead.stopped.set()
            await asyncio.gather(lookahead.guess, lookahead.ahead, return_exceptions=True)
