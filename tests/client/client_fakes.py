"""A scriptable fake ControllerService for the client SDK tests (served for real by conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from eesd_proto.eesd.v1 import common_pb2, controller_pb2, controller_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
# Test-only CA, server and client certificates (certs/gen.sh).
CERTS = Path(__file__).resolve().parent / "certs"
PROMPT_IDS = (1, 2, 3)
# Rounds commit 1, 2, 3, 1, 2, 3, ... tokens: accepted drafts + one recovered/bonus token.
ROUND_SIZES = (1, 2, 3)


def expected_tokens(max_new_tokens: int) -> list[int]:
    return [100 + i for i in range(max_new_tokens)]


def token_text(token: int) -> str:
    return f"t{token} "


@dataclass
class Drop:
    """One Generate attempt breaking: after `after_messages` messages (a resume's catch-up chunk and the
    summary count), the session commits `lost_rounds` more rounds the client never sees, then the call
    fails with `code`."""

    after_messages: int
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    lost_rounds: int = 0


@dataclass
class Behaviour:
    """What the fake does on its next calls; tests set it before calling."""

    # Generate attempts that fail with `transient_code` before sending anything (no session is created).
    unavailable_times: int = 0
    transient_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    # Every call fails with this code.
    fail_code: grpc.StatusCode | None = None
    # How the next Generate attempts that reach a session break, one entry per attempt, in order.
    drops: list[Drop] = field(default_factory=list)
    # Pause before each round.
    chunk_delay_s: float = 0.0
    # End the stream without its summary (a protocol violation).
    omit_summary: bool = False
    # Reject calls whose authorization metadata differs.
    required_token: str | None = None


def rounds_of(max_new_tokens: int) -> list[list[int]]:
    """The tokens each round commits."""
    tokens = expected_tokens(max_new_tokens)
    rounds: list[list[int]] = []
    while (position := sum(map(len, rounds))) < len(tokens):
        rounds.append(tokens[position : position + ROUND_SIZES[len(rounds) % len(ROUND_SIZES)]])
    return rounds


@dataclass
class FakeSession:
    """A session as the fake server holds it: its request (id set, received_tokens 0) and rounds committed."""

    request: controller_pb2.GenerateRequest
    rounds: list[list[int]]
    committed: int = 0

    def tokens(self) -> list[int]:
        return [t for ids in self.rounds[: self.committed] for t in ids]

    def commit(self, rounds: int) -> None:
        self.committed = min(len(self.rounds), self.committed + rounds)


def chunk_message(session_id: str, round_: int, ids: list[int], k: int) -> controller_pb2.GenerateResponse:
    return controller_pb2.GenerateResponse(
        session_id=session_id,
        chunk=controller_pb2.GenerationChunk(
            round=round_,
            token_ids=ids,
            text="".join(token_text(t) for t in ids),
            stats=common_pb2.RoundStats(
                k_chosen=k,
                drafted=k,
                accepted=max(len(ids) - 1, 0),
                committed=len(ids),
                draft_ms=1.0 * bool(k),
                verify_ms=2.0 * bool(k),
            ),
        ),
    )


@dataclass
class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """Streams deterministic chunks: token i of the completion is 100 + i, its text "t<id> ".

    Sessions follow the resume contract of controller.proto: a request repeating a session's request (same
    prompt, parameters and id) resumes it with one catch-up chunk of the tokens after `received_tokens`,
    then the remaining rounds and the summary; a different request with a used id is ALREADY_EXISTS.
    """

    behaviour: Behaviour = field(default_factory=Behaviour)
    generate_attempts: int = 0
    requests: list[controller_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    sessions: dict[str, controller_pb2.Session] = field(default_factory=dict)
    live: dict[str, FakeSession] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.metadata.append(metadata)
        b = self.behaviour
        if b.required_token is not None and metadata.get("authorization") != f"Bearer {b.required_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing bearer token")
        if b.fail_code is not None:
            context.abort(b.fail_code, f"told to fail with {b.fail_code.name}")

    def Generate(
        self, request: controller_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[controller_pb2.GenerateResponse]:
        with self.lock:
            self.generate_attempts += 1
            attempt = self.generate_attempts
            self.requests.append(request)
        self._check(context)
        b = self.behaviour
        if attempt <= b.unavailable_times:
            context.abort(b.transient_code, "controller warming up")
        session_id = request.session_id or f"session-{attempt}"
        original = controller_pb2.GenerateRequest()
        original.CopyFrom(request)
        original.session_id, original.received_tokens = session_id, 0
        session = self.live.get(session_id)
        catch_up = session is not None
        if session is None:
            if request.received_tokens:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "received_tokens beyond the session's tokens")
            session = self.live[session_id] = FakeSession(original, rounds_of(request.max_new_tokens))
        elif session.request != original:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} exists with another request")
        elif request.received_tokens > len(session.tokens()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "received_tokens beyond the session's tokens")
        drop = b.drops.pop(0) if b.drops else None
        messages = self._messages(session, request.received_tokens if catch_up else None)
        sent = 0
        while True:
            if drop is not None and sent == drop.after_messages:
                session.commit(drop.lost_rounds)
                context.abort(drop.code, "controller lost")
            message = next(messages, None)
            if message is None:
                return
            yield message
            sent += 1

    def _messages(self, session: FakeSession, received: int | None) -> Iterator[controller_pb2.GenerateResponse]:
        """A resume's catch-up chunk (`received` set), the rounds not committed yet, then the summary."""
        b = self.behaviour
        request = session.request
        session_id = request.session_id
        if received is not None:
            ids = session.tokens()[received:]
            yield chunk_message(session_id, max(session.committed - 1, 0), ids, 0)
        while session.committed < len(session.rounds):
            time.sleep(b.chunk_delay_s)
            round_ = session.committed
            session.commit(1)
            ids = session.rounds[round_]
            yield chunk_message(session_id, round_, ids, len(ids) + 1)
        prompt_tokens = len(request.prompt_ids.ids) if request.HasField("prompt_ids") else len(PROMPT_IDS)
        tokens = session.tokens()
        rounds = len(session.rounds)
        histogram: dict[int, int] = {}
        for ids in session.rounds:
            histogram[len(ids) + 1] = histogram.get(len(ids) + 1, 0) + 1
        self.sessions[session_id] = controller_pb2.Session(
            session_id=session_id,
            state=controller_pb2.SESSION_STATE_FINISHED,
            finish_reason=controller_pb2.FINISH_REASON_LENGTH,
            usage=controller_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens)),
            verifier_id="verifier-0",
            drafter_id="drafter-0",
            committed_token_ids=[*PROMPT_IDS, *tokens],
        )
        if b.omit_summary:
            return
        yield controller_pb2.GenerateResponse(
            session_id=session_id,
            summary=controller_pb2.GenerationSummary(
                finish_reason=controller_pb2.FINISH_REASON_LENGTH,
                usage=controller_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens)),
                speculation=controller_pb2.SpeculationStats(
                    rounds=rounds,
                    drafted=sum(k * n for k, n in histogram.items()),
                    accepted=len(tokens) - rounds,
                    mean_accepted_tokens=len(tokens) / rounds,
                    k_histogram=histogram,
                    policy=request.policy.name or "beta-ts",
                ),
                time_split=controller_pb2.TimeSplit(draft_ms=1.0 * rounds, verify_ms=2.0 * rounds, total_ms=9.0),
            ),
        )

    def Cancel(
        self, request: controller_pb2.CancelRequest, context: grpc.ServicerContext
    ) -> controller_pb2.CancelResponse:
        self._check(context)
        session = self.sessions.get(request.session_id)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        if session.state == controller_pb2.SESSION_STATE_ACTIVE:
            session.state = controller_pb2.SESSION_STATE_CANCELLED
        return controller_pb2.CancelResponse(session_id=request.session_id, state=session.state)

    def GetSession(
        self, request: controller_pb2.GetSessionRequest, context: grpc.ServicerContext
    ) -> controller_pb2.GetSessionResponse:
        self._check(context)
        session = self.sessions.get(request.session_id)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        reply = controller_pb2.Session()
        reply.CopyFrom(session)
        if not request.include_token_ids:
            del reply.committed_token_ids[:]
        return controller_pb2.GetSessionResponse(session=reply)


@dataclass
class Server:
    fake: FakeController
    address: str
