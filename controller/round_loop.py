"""The controller's core (transport-free): one session's rounds over a (drafter, verifier) pair.

Committed tokens and the policy posterior are the hard state, written to the store in one atomic step
per round guarded by the round number and the driver's epoch. KV caches are soft state: a node whose
cache disagrees is told what to prefill; a lost drafter is replaced (or the session decodes
verifier-only), a lost verifier is replaced, and the output stays the same because every round's
randomness derives from (seed, round). A session whose stream was lost is resumed from the store by any
controller (docs/architecture.md §8.7): it takes the session over under a new epoch, sends the client the
tokens it missed and goes on from the stored round.
"""

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict, dataclass, field, replace

from controller.nodes import Mismatch, NodeClients, RoundOutcome
from controller.patience import StorePatience
from controller.routing import Router
from controller.state_store import ACTIVE, SessionRecord, StateStore
from controller.text import TextCodec, TextStream
from eesd.errors import (
    Aborted,
    AlreadyExists,
    EesdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from eesd.generation import GenerationStats
from eesd.load import Ewma
from eesd.params import GenerationParams, check_context, check_token_ids, new_owner, validate_prompt
from eesd.rounds import RoundStats, TokenLogprob
from eesd.session import RoundResult, Session, reproducible
from eesd.stops import StopText
from serving import tracing
from serving.metrics import controller_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundEvent:
    session_id: str
    round_index: int
    tokens: list[int]  # committed this round (after EOS / length trimming)
    stats: RoundStats
    transport_ms: float
    controller_ms: float
    # A resumed stream's first event: the generated tokens its client already has, which its text continues.
    context: list[int] = field(default_factory=list)
    replay: bool = False  # that first event: tokens of earlier rounds the client missed, not a round of its own
    # The text to send for these tokens (decoded incrementally; text that may begin a stop string waits
    # for the next round, and at a stop string the text ends where it begins: eesd/stops.py). Empty
    # without a tokenizer.
    text: str = ""
    # The log probabilities of `tokens` (eesd/logprobs.py) when the request asked for them, else None; None
    # in a resumed stream's first event too (they are not stored with the session).
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Finished:
    session_id: str
    finish_reason: str  # "eos", "stop", "length" or "cancelled"
    prompt_tokens: int
    stats: GenerationStats
    transport_ms: float
    controller_ms: float
    # Text held back at the last round (it might have begun a stop string) that no round sent: only a
    # cancelled session with stop strings leaves any.
    text: str = ""


PROMPT_CONTEXT = 8  # prompt tokens the text decoder reads before a session's first generated token
STREAM_ENDED = "the client's stream ended before the session did; resume it with its session id and received_tokens"


def _request(params: GenerationParams, seed: int) -> dict:
    """A session's request as stored (JSON-able): what a resuming request must repeat."""
    request = {
        "max_new_tokens": params.max_new_tokens,
        "sampling": asdict(params.sampling),
        "seed": seed,
        "policy": asdict(params.policy),
        "stop_on_eos": params.stop_on_eos,
    }
    if params.stop:  # only then: sessions stored before stop conditions existed still resume
        request["stop"] = params.stop.stored()
    return request


def _replayed(session: Session, tokens: list[int], texts: StopText, ended: bool) -> RoundEvent:
    """A resumed stream's first event: the committed tokens its client missed, as of the last round, and
    their text (the text of the tokens its client has is taken as sent; all of it when the session `ended`)."""
    last_round = max(session.round_index - 1, 0)
    stats = RoundStats(last_round, 0, 0, 0, len(tokens), 0.0, 0.0)
    had = session.generated[: len(session.generated) - len(tokens)]
    texts.skip(had)
    text = texts.feed(tokens).text + (texts.flush() if ended else "")
    return RoundEvent(session.session_id, last_round, tokens, stats, 0.0, 0.0, had, replay=True, text=text)


def _stopped(result: RoundResult, texts: StopText) -> tuple[RoundResult, str]:
    """`result` ended at the first stop string its text completes (finish reason "stop", the tokens after
    it dropped before they are committed), and the text to send for it."""
    scan = texts.feed(result.tokens)
    if scan.keep is not None:
        tokens = result.tokens[: scan.keep]
        stats = replace(result.stats, committed=len(tokens))
        logprobs = None if result.logprobs is None else result.logprobs[: len(tokens)]
        result = replace(result, tokens=tokens, finish_reason="stop", stats=stats, logprobs=logprobs)
    return result, scan.text + (texts.flush() if result.finish_reason is not None else "")


@dataclass
class _Pair:
    """The session's nodes (the session says how many committed tokens each one's cache covers)."""

    drafter: str | None
    verifier: str


class RoundLoop:
    def __init__(
        self,
        store: StateStore,
        router: Router,
        nodes: NodeClients,
        eos_token_ids: frozenset[int],
        vocab_size: int | None,
        unavailable_wait_s: float = 30.0,
        admission_wait_s: float = 30.0,
        context: int | None = None,
        max_sessions: int = 1024,
        store_wait_s: float = 30.0,
        end_retry_s: float = 3600.0,
        codec: TextCodec | None = None,
    ):
        self.store, self.router, self.nodes = store, router, nodes
        self.codec = codec  # the served model's tokenizer: events carry their text, stop strings are found
        # Store calls of running sessions wait out an unreachable store for store_wait_s and write back a
        # session the store lost (controller/patience.py); _records: each running session's stored record.
        self.patience = StorePatience(store, store_wait_s, end_retry_s)
        self._records: dict[str, SessionRecord] = {}
        self.eos_token_ids, self.vocab_size = eos_token_ids, vocab_size
        self.unavailable_wait_s, self.admission_wait_s = unavailable_wait_s, admission_wait_s
        self.context = context  # the model's context, when known: longer requests are refused up front
        # What a round costs per session outside the nodes' passes, sent with every Draft for load-aware
        # sizing: this controller's own work (store included), plus the hops at their cheapest recent
        # time. Only the cheapest: the rest of a round's wire time is queueing behind other sessions, a
        # sign of load that must not make drafting look cheaper.
        self._own = Ewma()
        self._wire: deque[float] = deque(maxlen=64)
        self.max_sessions = max_sessions  # Generate calls at once, admitted or waiting; more: RESOURCE_EXHAUSTED
        self._generating = 0
        self._running: set[str] = set()  # sessions this controller drives now
        controller_metrics().watch_running(lambda: len(self._running))
        self._cancelled: set[str] = set()  # ... that a Cancel asked to stop
        self._tasks: set[asyncio.Task] = set()

    def round_overhead(self) -> float:
        """Seconds a round costs per session outside the nodes' passes (see __init__)."""
        return (self._own.value or 0.0) + (min(self._wire) if self._wire else 0.0)

    def cancel_local(self, session_id: str) -> None:
        """Stops the session at its next round if this controller drives it (else the store's end does)."""
        if session_id in self._running:
            self._cancelled.add(session_id)

    async def generate(
        self, prompt_ids: list[int], params: GenerationParams, session_id: str = "", received_tokens: int = 0
    ) -> AsyncIterator[RoundEvent | Finished]:
        """A new session's events; or, when `session_id` names a stored session with this very request, the
        resumed session's: first the tokens after the `received_tokens` its client has, then the rest."""
        params.validate()
        if self.vocab_size is not None:
            validate_prompt(prompt_ids, self.vocab_size)
            check_token_ids("stop_token_ids", list(params.stop.token_ids), self.vocab_size)
        elif not prompt_ids:
            raise InvalidArgument("prompt_ids", "prompt is empty")
        if params.stop.strings and self.codec is None:
            raise InvalidArgument("stop", "stop strings need the controller's tokenizer (--model-dir)")
        if self.context is not None:
            check_context(len(prompt_ids), params.max_new_tokens, self.context)
        if self._generating >= self.max_sessions:
            raise ResourceExhausted(
                f"this controller serves its maximum of {self.max_sessions} sessions (running or waiting "
                "for KV room); retry later"
            )
        self._generating += 1
        try:
            stored = await self._stored(session_id) if session_id else None
            if stored is None:
                if received_tokens:
                    raise InvalidArgument("received_tokens", "must be 0 for a new session")
                seed = params.sampling.seed if params.sampling.seed is not None else secrets.randbits(63)
                session = Session.start(
                    session_id or uuid.uuid4().hex, prompt_ids, params, seed, self.eos_token_ids, new_owner()
                )
                events = self._drive(session)
            else:
                events = self._resume(stored, prompt_ids, params, received_tokens)
            # aclosing: a client that hangs up closes this generator, and the session's own cleanup (ended
            # resumable, nodes released) must run then, not whenever the inner generator is collected.
            async with contextlib.aclosing(events) as events:
                async for event in events:
                    yield event
        finally:
            self._generating -= 1

    async def _stored(self, session_id: str) -> SessionRecord | None:
        try:
            return await self.patience.call(lambda: self.store.get_session(session_id))
        except NotFound:
            return None

    async def _resume(
        self, stored: SessionRecord, prompt_ids: list[int], params: GenerationParams, received_tokens: int
    ) -> AsyncIterator[RoundEvent | Finished]:
        """Takes `stored` over (it must be the session of this very request) and drives it on; a session
        that finished or was cancelled only replays what its client missed."""
        session_id = stored.session_id
        seed = stored.params.get("seed") if params.sampling.seed is None else params.sampling.seed
        same = stored.committed[: stored.prompt_length] == list(prompt_ids)
        if not same or stored.params != _request(reproducible(params), seed):
            raise AlreadyExists("session_id", f"session {session_id!r} exists, with another request")
        generated = len(stored.committed) - stored.prompt_length
        if received_tokens > generated:
            raise InvalidArgument("received_tokens", f"must be <= {generated}, the tokens the session generated")
        owner = new_owner()
        record = await self.patience.call(lambda: self.store.take_over(session_id, owner))
        session = Session.resume(
            session_id,
            record.committed,
            record.prompt_length,
            params,
            seed,
            record.policy_state,
            record.next_round,
            self.eos_token_ids,
            owner,
        )
        log.info(
            "session %s: resumed at round %d (%s, epoch %d)", session_id, record.next_round, record.status, record.epoch
        )
        missed = session.generated[received_tokens:]
        if record.status != ACTIVE:  # finished or cancelled: nothing more to generate
            yield _replayed(session, missed, self._texts(session), ended=True)
            yield Finished(session_id, record.finish_reason, session.prompt_length, session.stats, 0.0, 0.0)
            return
        for role, address in (("drafter", stored.drafter), ("verifier", stored.verifier)):
            if address and stored.owner:  # the previous driver's caches: this one opens its own
                self._spawn(self.nodes.close_session(role, address, session_id, stored.owner))
        async with contextlib.aclosing(self._drive(session, record, missed)) as events:
            async for event in events:
                yield event

    async def _drive(
        self, session: Session, resumed: SessionRecord | None = None, missed: list[int] | None = None
    ) -> AsyncIterator[RoundEvent | Finished]:
        """Admits the session, stores it (or, `resumed`, its taken-over record), sends a resumed session's
        `missed` tokens, runs its rounds and ends it in the store."""
        session_id = session.session_id
        texts = self._texts(session)
        if missed is not None:
            yield _replayed(session, missed, texts, ended=session.finish_reason is not None)
        pair = await self._admit(session) if session.finish_reason is None else _Pair(None, "")
        await self._register(session, pair, resumed)
        self._running.add(session_id)
        transport_ms = controller_ms = 0.0
        start = time.perf_counter()
        try:
            while session.finish_reason is None:
                if session_id in self._cancelled:
                    session.finish_reason = "cancelled"
                    break
                round_start = time.perf_counter()
                if session.speculates and pair.drafter is None and (drafter := self.router.pick_drafter()):
                    if await self._open_drafter(session, drafter):  # a drafter is back: speculate again
                        pair.drafter, session.drafter_length = drafter, 0
                        await self._set_route(session, pair)
                outcome = await self._run_round(session, pair)
                call_done = time.perf_counter()
                result = session.settle(
                    outcome.draft,
                    outcome.verdict,
                    outcome.drafter_cache_length,
                    outcome.draft_ms / 1e3,
                    outcome.verify_ms / 1e3,
                )
                result, text = _stopped(result, texts)  # before the commit: nothing after a stop is stored
                try:
                    epoch = self._records[session_id].epoch
                    commit = functools.partial(
                        self.store.commit_round,
                        session_id,
                        session.round_index,
                        result.tokens,
                        result.policy_state,
                        epoch,
                    )
                    await self.patience.call(commit, lambda: self._snapshot(session, pair))
                except FailedPrecondition:  # cancelled through another controller
                    session.finish_reason = "cancelled"
                    texts.flush()  # held text includes this round's, which was not committed: none is sent
                    break
                session.apply(result)
                own_ms = (time.perf_counter() - call_done) * 1e3
                wire_ms = max(0.0, (call_done - round_start) * 1e3 - outcome.draft_ms - outcome.verify_ms)
                transport_ms += wire_ms
                controller_ms += own_ms
                self._own.add(own_ms / 1e3)
                self._wire.append(wire_ms / 1e3)
                yield RoundEvent(
                    session_id,
                    result.stats.round_index,
                    result.tokens,
                    result.stats,
                    wire_ms,
                    own_ms,
                    text=text,
                    logprobs=result.logprobs,
                )
            stats = session.stats
            stats.elapsed_s = time.perf_counter() - start
            finish_reason = session.finish_reason
            status = "cancelled" if finish_reason == "cancelled" else "finished"
            at = self._snapshot(session, pair)
            # Written in the background if the store is down now: the client has every token already.
            await self.patience.end(session_id, lambda: self.store.finish(session_id, status, finish_reason, at), at)
            yield Finished(
                session_id, finish_reason, session.prompt_length, stats, transport_ms, controller_ms, texts.flush()
            )
        except (asyncio.CancelledError, GeneratorExit):
            # The client's stream ended (it went away, or this controller is stopping): what was committed
            # stays and the session ends failed, CANCELLED, which a resume takes up again (a Cancel ends it
            # for good). A closing generator cannot await, so the store write runs as a tracked task.
            at = self._snapshot(session, pair)
            write = functools.partial(self.store.fail, session_id, "CANCELLED", STREAM_ENDED, at)
            self.patience.end_later(session_id, write, at)
            raise
        except Aborted:  # another controller drives the session now: its end is that controller's to write
            raise
        except Exception as error:
            # What was committed stays; GetSession says FAILED with the status the client got.
            domain = isinstance(error, EesdError)
            code, message = (error.status, str(error)) if domain else ("INTERNAL", "internal error")
            await self._record_failure(session_id, code, message, self._snapshot(session, pair))
            raise
        finally:
            self._records.pop(session_id, None)
            self._running.discard(session_id)
            self._cancelled.discard(session_id)
            self._leave(session, pair)

    def _texts(self, session: Session) -> StopText:
        """A fresh text of the session's generated tokens, with its stop strings. The decoder first reads the
        prompt's last tokens (their text is not sent): a generated token's text depends on what precedes it
        (a word's leading space, a character split across tokens), and prompt + completion must read as the
        whole sequence does."""
        if self.codec is None:
            return StopText(session.params.stop.strings, None)
        stream = TextStream(self.codec)
        stream.skip(session.committed[max(0, session.prompt_length - PROMPT_CONTEXT) : session.prompt_length])
        return StopText(session.params.stop.strings, stream.step)

    def _spawn(self, work: Awaitable[None]) -> None:
        """Runs best-effort cleanup in the background, holding the task until it is done (the event loop
        keeps only weak references) and logging its failure; `aclose` waits for what is still running."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background cleanup failed: %r", task.exception())

    async def aclose(self) -> None:
        """Waits for the background cleanup still in flight (at shutdown, before the store closes), and a
        little for session ends that wait for the store."""
        await self.patience.aclose()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _snapshot(self, session: Session, pair: _Pair) -> SessionRecord:
        """The session's record as this controller holds it now: what its client has been sent. The store
        gets it back when it lost the session, and a session's end is written at this point."""
        return replace(
            self._records[session.session_id],
            committed=list(session.committed),
            next_round=session.round_index,
            policy_state=dict(session.policy_state),
            drafter=pair.drafter or "",
            verifier=pair.verifier,
            stats=session.stats.speculation(session.params.policy.name),
        )

    async def _set_route(self, session: Session, pair: _Pair) -> None:
        epoch = self._records[session.session_id].epoch
        await self.patience.call(
            lambda: self.store.set_route(session.session_id, pair.drafter or "", pair.verifier, epoch),
            lambda: self._snapshot(session, pair),
        )

    async def _record_failure(self, session_id: str, code: str, message: str, at: SessionRecord) -> None:
        """Ends the session as failed at `at`; in the background when the store is down (the round may
        have failed for just that), so that it does not stay active in the store."""
        try:
            await self.patience.end(session_id, lambda: self.store.fail(session_id, code, message, at), at)
        except EesdError as store_error:  # the store is down too: the client still gets the first error
            log.warning("session %r: could not record its failure (%s): %s", session_id[:64], code, store_error)

    async def _register(self, session: Session, pair: _Pair, resumed: SessionRecord | None) -> None:
        """Stores a new session, or pins a resumed one's nodes under its epoch; on failure the nodes are left."""
        if resumed is None:
            await self._create_session(session, pair)
            return
        self._records[session.session_id] = resumed
        try:
            await self._set_route(session, pair)
        except BaseException:
            self._records.pop(session.session_id, None)
            self._leave(session, pair)
            raise

    async def _create_session(self, session: Session, pair: _Pair) -> None:
        record = SessionRecord(
            session.session_id,
            list(session.committed),
            session.prompt_length,
            0,
            session.policy_state,
            _request(session.params, session.seed),
            pair.drafter or "",
            pair.verifier,
            owner=session.owner,
        )
        self._records[session.session_id] = replace(record, created_at=time.time())
        token = uuid.uuid4().hex  # a create retried after a lost reply is recognised as this one
        try:
            await self.patience.call(lambda: self.store.create_session(record, token))
        except BaseException:
            self._records.pop(session.session_id, None)
            self._leave(session, pair)
            raise

    async def _admit(self, session: Session) -> _Pair:
        """Picks the session's nodes and opens it on them, reserving its whole length in their KV pools so
        that it never runs out mid-way. A drafter that cannot hold it leaves the session verifier-only."""
        length = len(session.committed) + session.params.max_new_tokens
        with controller_metrics().queued():
            pair = _Pair(None, await self._reserve_verifier(session, length))
        drafter = self.router.pick_drafter() if session.speculates else None
        if drafter is not None and await self._open_drafter(session, drafter):
            pair.drafter = drafter
        return pair

    async def _reserve_verifier(self, session: Session, length: int) -> str:
        """A verifier that opened the session with `length` KV positions reserved; while none has room it
        waits, at most admission_wait_s, then RESOURCE_EXHAUSTED; while none is ready (starting, restarting,
        lost) it waits as long, then UNAVAILABLE."""
        deadline, pause = time.monotonic() + self.admission_wait_s, 0.05
        wrong: FailedPrecondition | None = None  # a verifier that serves another model: said at once
        while True:
            verifier = self.router.pick_verifier()
            if verifier is None:
                if wrong is not None:
                    raise wrong
                if time.monotonic() + pause > deadline:
                    raise Unavailable("no verifier is ready")
                await asyncio.sleep(pause)
                pause = min(2 * pause, 1.0)
                continue
            # Load is taken before the first await: sessions arriving together must see each other's load,
            # or a burst of them all picks the same least-loaded verifier.
            self.router.acquire(verifier)
            try:
                await self.nodes.open_session("verifier", verifier, session.session_id, session.owner, length)
                return verifier
            except ResourceExhausted as full:
                self.router.release(verifier)
                if time.monotonic() + pause > deadline:
                    raise ResourceExhausted(
                        f"no verifier could hold this session's {length} KV positions within "
                        f"{self.admission_wait_s:g} s ({full}); retry later or ask for fewer tokens"
                    ) from full
                await asyncio.sleep(pause)
                pause = min(2 * pause, 1.0)
            except (Unavailable, FailedPrecondition) as error:  # dead, hung or another model: try another
                log.warning("verifier %s cannot take sessions (%s)", verifier, error)
                self.router.release(verifier)
                self.router.mark_down(verifier)
                wrong = error if isinstance(error, FailedPrecondition) else wrong
            except BaseException:
                self.router.release(verifier)
                raise

    async def _open_drafter(self, session: Session, drafter: str) -> bool:
        """Opens the session on `drafter` (taking its load); False when it cannot hold the session now."""
        self.router.acquire(drafter)
        length = len(session.committed) + session.params.max_new_tokens
        try:
            await self.nodes.open_session("drafter", drafter, session.session_id, session.owner, length)
            return True
        except (ResourceExhausted, Unavailable, FailedPrecondition) as error:
            log.info(
                "session %s: drafter %s cannot take it (%s); verifier-only for now", session.session_id, drafter, error
            )
            self.router.release(drafter)
            if not isinstance(error, ResourceExhausted):  # out of routing, like a drafter lost mid-round
                self.router.mark_down(drafter)
            return False

    def _leave(self, session: Session, pair: _Pair) -> None:
        """Gives the session's place on its nodes back: their load here, their caches there."""
        self.router.release(pair.drafter or "", pair.verifier)
        for role, address in (("drafter", pair.drafter), ("verifier", pair.verifier)):
            if address:
                self._spawn(self.nodes.close_session(role, address, session.session_id, session.owner))

    async def _run_round(self, session: Session, pair: _Pair) -> RoundOutcome:
        """The round's node calls, a span of the request's trace when tracing is on (the nodes' spans are its
        children)."""
        attributes = {"eesd.session_id": session.session_id, "eesd.round": session.round_index}
        with tracing.span("eesd.round", attributes) as span:
            outcome = await self._round_calls(session, pair)
            tracing.annotate(
                span,
                **{
                    "eesd.drafter": pair.drafter or "",
                    "eesd.verifier": pair.verifier,
                    "eesd.drafted": len(outcome.draft.tokens),
                    "eesd.accepted": outcome.verdict.accepted,
                    "eesd.verifier_only": outcome.drafter_cache_length is None,
                },
            )
            return outcome

    async def _round_calls(self, session: Session, pair: _Pair) -> RoundOutcome:
        """Runs the session's next round until it has a verdict, repairing caches and replacing nodes."""
        deadline = time.monotonic() + self.unavailable_wait_s
        while True:
            try:
                if pair.drafter is not None and session.draft_room > 0:
                    await self._catch_up(session, pair)
                    base = min(session.drafter_length, session.verifier_length)
                    request = session.draft_request(base, self.round_overhead())
                    outcome = await self.nodes.draft(pair.drafter, request, pair.verifier)
                else:
                    request = session.verify_request(session.verifier_length)
                    outcome = await self.nodes.verify(pair.verifier, request)
            except Unavailable as error:
                if time.monotonic() > deadline:
                    raise
                await self._replace(session, pair, error)
                continue
            if isinstance(outcome, Mismatch):
                log.info(
                    "session %s round %d: %s cache holds %d tokens; resending from there",
                    session.session_id,
                    session.round_index,
                    outcome.role,
                    outcome.cache_length,
                )
                setattr(session, f"{outcome.role}_length", outcome.cache_length)
                continue
            return outcome

    async def _catch_up(self, session: Session, pair: _Pair) -> None:
        """Prefills whichever node lags by more than a token, so the shared base does not drag the other
        node back (a fresh drafter must not make the verifier recompute the whole context)."""
        committed, target = session.committed, len(session.committed) - 1
        for role, address in (("drafter", pair.drafter), ("verifier", pair.verifier)):
            # A mismatch answer reports a shorter cache, so this loop ends at the latest at length 0.
            while target - (length := getattr(session, f"{role}_length")) > 1:
                reply = await self.nodes.prefill(
                    role,
                    address,
                    session.session_id,
                    session.owner,
                    session.round_index,
                    length,
                    committed[length:target],
                )
                setattr(session, f"{role}_length", reply.cache_length if isinstance(reply, Mismatch) else reply)

    async def _replace(self, session: Session, pair: _Pair, error: Unavailable) -> None:
        """Routes around an unavailable node; with no drafter left the session decodes verifier-only."""
        session_id = session.session_id
        failed = pair.verifier if error.peer == "verifier" else pair.drafter
        log.warning("session %s: %s unavailable (%s)", session_id, error.peer or "node", error)
        self.router.mark_down(failed)
        self.router.release(failed)
        if error.peer == "verifier":
            replacement = self.router.pick_verifier(exclude=failed)
            pair.verifier, session.verifier_length = replacement or failed, 0
            if replacement is None:
                await asyncio.sleep(0.2)  # the only verifier may be restarting: retry it after a pause
        else:
            pair.drafter, session.drafter_length = self.router.pick_drafter(exclude=failed), 0
        # Only the replacement takes the released load; the node that did not fail already holds it.
        self.router.acquire(pair.verifier if error.peer == "verifier" else pair.drafter or "")
        await self._set_route(session, pair)
