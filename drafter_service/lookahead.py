"""Pipelined drafting on a drafter node (docs/architecture.md §5.3): round r+1 is drafted while round r is verified.

A lookahead starts as soon as a block has gone to the verifier, in up to three steps:
  1. feed the block's last draft and guess round r+1's request (model thread). Whenever the verifier
     accepts the whole block this step happens, ahead (if the node is idle) or at the start of the next
     round (if it was busy): the same single-token pass either way, so the length the drafter reports,
     the next round's base and every number computed after it never depend on timing. A verdict that
     rejected a draft spares it;
  2. propose the guessed request (model thread), only while no other model call waits: under load the
     node drafts what the controller asks and nothing ahead. It stops as soon as the guess fails or work
     arrives;
  3. once round r's verdict proves the guess right (every draft accepted, the bonus token guessed), send
     the block to the same verifier without waiting for the controller, and start the next lookahead.
The controller still drives every round: the next Draft takes the block (and the verdict under way) when
its request is exactly the guessed one, anything else drops the session's lookaheads first. The drafter
never runs more than one round ahead of the controller, and what it sends early is the very message the
round would send, so a guess that the controller does not follow (the session ended) costs only work.
"""

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from eesd.drafter import DraftStopped
from eesd.errors import EesdError
from eesd.rounds import DraftBlock, DraftRequest
from serving.node import ModelNode

log = logging.getLogger(__name__)

Send = Callable[[DraftRequest, DraftBlock], Awaitable]  # a round's request and block -> the verifier's answer
# A round's request and verifier -> what load-aware policies size its block by: the draft cost ratio
# measured now (None before there is a measurement) and the node's recent verdicts as pseudo-counts.
Sizing = Callable[[DraftRequest, str], tuple[float | None, tuple[float, float]]]


@dataclass
class _Lookahead:
    verifier_address: str  # the verifier of round r, to which a right guess is sent
    send: Send
    guess: asyncio.Future  # step 1: the guessed DraftRequest of round r+1, or None (no room)
    ahead: asyncio.Task  # step 2: the block drafted for the guess, or None (skipped or stopped)
    stopped: threading.Event  # read by the model thread between drafts
    answer: asyncio.Task | None = None  # step 3: the verifier's answer to the block sent ahead

    def guessed(self, request: DraftRequest, verifier_address: str) -> bool:
        guess = self.guess
        done = guess.done() and not guess.cancelled() and guess.exception() is None
        return done and guess.result() == request and verifier_address == self.verifier_address


@dataclass(frozen=True)
class Ahead:
    """What a Draft finds ready for its request: the block, and the verifier's answer when it went out early."""

    block: DraftBlock
    answer: asyncio.Task | None


class Lookaheads:
    def __init__(
        self,
        node: ModelNode,
        enabled: bool = True,
        sizing: Sizing = lambda request, verifier: (None, (0.0, 0.0)),
    ):
        self.node, self.enabled, self.sizing = node, enabled, sizing
        # Keyed by the node's session key (id and owner), like the KV pool.
        self._sessions: dict[str, dict[int, _Lookahead]] = {}  # session -> round drafted ahead -> lookahead
        # Blocks whose step 1 waits for the verdict (the node was busy), then for the next round if due.
        self._unfed: dict[str, tuple[DraftRequest, DraftBlock]] = {}
        self._owed: dict[str, tuple[DraftRequest, DraftBlock]] = {}

    def propose(
        self,
        request: DraftRequest,
        verifier_address: str,
        stop: Callable[[], bool] = lambda: False,
        op: str = "propose",
    ) -> Awaitable[DraftBlock]:
        """Drafts `request` in the node's passes, sized by the load measured now with this verifier."""
        measured_cost, pooled = self.sizing(request, verifier_address)
        job = self.node.model.propose_job(request, stop, measured_cost, pooled=pooled)
        return self.node.run_job(job, op, request.key, len(request.pending))

    def _lookahead(
        self, request: DraftRequest, block: DraftBlock, stop: Callable[[], bool] = lambda: False
    ) -> Awaitable[DraftRequest | None]:
        job = self.node.model.lookahead_job(request, block, stop)
        return self.node.run_job(job, "lookahead", request.key)

    def start(self, request: DraftRequest, block: DraftBlock, verifier_address: str, send: Send) -> None:
        """Begins drafting round r+1 of `request`'s session; `block` is round r's, just sent to the verifier."""
        if not self.enabled or not block.tokens:
            return
        if self.node.queued:  # other sessions want the node: step 1 only if the verdict needs it
            self._unfed[request.key] = (request, block)
            return
        stopped = threading.Event()  # a verdict that already rejected a draft spares even step 1
        guess = asyncio.ensure_future(self._lookahead(request, block, stopped.is_set))
        ahead = asyncio.create_task(self._propose_ahead(guess, stopped, verifier_address))
        lookahead = _Lookahead(verifier_address, send, guess, ahead, stopped)
        self._sessions.setdefault(request.key, {})[request.round_index + 1] = lookahead

    async def _propose_ahead(
        self, guess: asyncio.Future, stopped: threading.Event, verifier_address: str
    ) -> DraftBlock | None:
        try:
            request = await guess
            if request is None or stopped.is_set() or self.node.queued:
                return None
            # Stop between drafts once the guess failed or another call waits: other sessions go first.
            busy = lambda: stopped.is_set() or self.node.queued > 1  # noqa: E731
            return await self.propose(request, verifier_address, busy, op="propose_ahead")
        except (DraftStopped, EesdError) as error:  # the session moved on or closed: nothing to keep
            log.debug("lookahead dropped: %r", error)
            return None

    async def _send_ahead(self, lookahead: _Lookahead):
        """Step 3: the block goes out as soon as it is drafted, and the round after it is drafted ahead."""
        block = await asyncio.shield(lookahead.ahead)
        if block is None or lookahead.stopped.is_set():
            return None
        request = lookahead.guess.result()
        answer = asyncio.ensure_future(lookahead.send(request, block))
        self.start(request, block, lookahead.verifier_address, lookahead.send)
        return await answer

    async def settle(self, request: DraftRequest, accepted_all: bool, next_token: int) -> bool:
        """Round r's verdict is in: keeps round r+1's lookahead only if its guess came true, and then sends
        its block ahead. True when the cache covers the whole block of round r (the verifier accepted all
        of it and step 1 fed, or will feed, the last draft)."""
        if (unfed := self._unfed.pop(request.key, None)) is not None:
            if accepted_all:
                self._owed[request.key] = unfed
            return accepted_all
        lookahead = self._sessions.get(request.key, {}).get(request.round_index + 1)
        if lookahead is None:
            return False
        if not accepted_all:
            lookahead.stopped.set()
            return False
        try:
            guess = await asyncio.shield(lookahead.guess)
        except (DraftStopped, EesdError):
            return False
        if guess is None or guess.pending != [next_token]:
            lookahead.stopped.set()
        else:
            lookahead.answer = asyncio.create_task(self._send_ahead(lookahead))
        return True

    async def take(self, request: DraftRequest, verifier_address: str) -> Ahead | None:
        """What was drafted (and maybe sent) ahead for exactly this request, or None; then the session holds
        no lookahead that another request could collide with."""
        if (owed := self._owed.pop(request.key, None)) is not None:  # step 1 of a busy round, now
            self.node.metrics.lookahead("skipped")
            try:
                await self._lookahead(*owed)
            except (DraftStopped, EesdError) as error:  # the cache moved on: the request will say so
                log.debug("owed lookahead step dropped: %r", error)
        lookaheads = self._sessions.get(request.key, {})
        lookahead = lookaheads.get(request.round_index)
        if lookahead is None or not lookahead.guessed(request, verifier_address):
            if lookahead is not None:
                self.node.metrics.lookahead("dropped")
            await self.drop(request.key)
            return None
        del lookaheads[request.round_index]
        if not lookaheads:
            del self._sessions[request.key]
        block = await asyncio.shield(lookahead.ahead)
        if block is None:
            self.node.metrics.lookahead("skipped")  # the guess held but the node had other work
            return None
        self.node.metrics.lookahead("used")
        return Ahead(block, lookahead.answer)

    async def drop(self, key: str) -> None:
        """Ends the session's lookaheads (and waits for them) before something else touches its cache."""
        self._unfed.pop(key, None)
        self._owed.pop(key, None)
        lookaheads = self._sessions.pop(key, {}).values()
        for lookahead in lookaheads:
            lookahead.stopped.set()
            if lookahead.answer is not None:  # a verdict nobody will take; its verifier may hang
                lookahead.answer.cancel()
        tasks = [t for la in lookaheads for t in (la.guess, la.ahead, la.answer) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
