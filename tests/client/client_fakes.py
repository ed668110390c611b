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
class Behaviour:
    """What the fake does on its next calls; tests set it before calling."""

    # Generate attempts that fail with `transient_code` before sending anything.
    unavailable_times: int = 0
    transient_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    # Every call fails with this code.
    fail_code: grpc.StatusCode | None = None
    # Generate fails with UNAVAILABLE after this many chunks.
    unavailable_after_chunks: int | None = None
    # Pause before each chunk.
    chunk_delay_s: float = 0.0
    # End the stream without its summary (a protocol violation).
    omit_summary: bool = False
    # Reject calls whose authorization metadata differs.
    required_token: str | None = None


@dataclass
class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """Streams deterministic chunks: token i of the completion is 100 + i, its text "t<id> "."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    generate_attempts: int = 0
    requests: list[controller_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    sessions: dict[str, controller_pb2.Session] = field(default_factory=dict)
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
        prompt_tokens = len(request.prompt_ids.ids) if request.HasField("prompt_ids") else len(PROMPT_IDS)
        tokens = expected_tokens(request.max_new_tokens)
        histogram: dict[int, int] = {}
        position = 0
        round_ = 0
        while position < len(tokens):
            if b.unavailable_after_chunks == round_:
                context.abort(grpc.StatusCode.UNAVAILABLE, "verifier lost")
            time.sleep(b.chunk_delay_s)
            ids = tokens[position : position + ROUND_SIZES[round_ % len(ROUND_SIZES)]]
            k = len(ids) + 1
            histogram[k] = histogram.get(k, 0) + 1
            yield controller_pb2.GenerateResponse(
                session_id=session_id,
                chunk=controller_pb2.GenerationChunk(
                    round=round_,
                    token_ids=ids,
                    text="".join(token_text(t) for t in ids),
                    stats=common_pb2.RoundStats(
                        k_chosen=k,
                        drafted=k,
                        accepted=len(ids) - 1,
                        committed=len(ids),
                        draft_ms=1.0,
                        verify_ms=2.0,
                    ),
                ),
            )
            position += len(ids)
            round_ += 1
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
                    rounds=round_,
                    drafted=sum(k * n for k, n in histogram.items()),
                    accepted=len(tokens) - round_,
                    mean_accepted_tokens=len(tokens) / round_,
                    k_histogram=histogram,
                    policy=request.policy.name or "beta-ts",
                ),
                time_split=controller_pb2.TimeSplit(draft_ms=1.0 * round_, verify_ms=2.0 * round_, total_ms=9.0),
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
