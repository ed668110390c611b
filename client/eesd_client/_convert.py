"""Conversions between the SDK's dataclasses and the controller's proto messages."""

from __future__ import annotations

import grpc

from eesd_client._stubs import common_pb2, controller_pb2
from eesd_client.errors import ProtocolError
from eesd_client.types import (
    FinalStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Policy,
    RoundStats,
    SessionError,
    SessionInfo,
    SessionState,
    SpeculationStats,
    TimeSplit,
    TokenLogprob,
    Usage,
)

_FINISH_REASONS = {
    controller_pb2.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    controller_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    controller_pb2.FINISH_REASON_EOS: FinishReason.EOS,
    controller_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    controller_pb2.FINISH_REASON_STOP: FinishReason.STOP,
}
_SESSION_STATES = {
    controller_pb2.SESSION_STATE_UNSPECIFIED: SessionState.UNSPECIFIED,
    controller_pb2.SESSION_STATE_ACTIVE: SessionState.ACTIVE,
    controller_pb2.SESSION_STATE_FINISHED: SessionState.FINISHED,
    controller_pb2.SESSION_STATE_CANCELLED: SessionState.CANCELLED,
    controller_pb2.SESSION_STATE_FAILED: SessionState.FAILED,
}


def generate_request_to_proto(request: GenerationRequest) -> controller_pb2.GenerateRequest:
    message = controller_pb2.GenerateRequest(
        max_new_tokens=request.max_new_tokens,
        sampling=common_pb2.SamplingParams(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed
        ),
        policy=common_pb2.PolicyParams(
            name=request.policy.value if isinstance(request.policy, Policy) else request.policy or "",
            k_max=request.k_max,
            options=dict(request.policy_options),
        ),
        session_id=request.session_id or "",
        ignore_eos=not request.stop_on_eos,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        top_logprobs=request.top_logprobs,
    )
    if isinstance(request.prompt, str):
        message.prompt_text = request.prompt
    else:
        message.prompt_ids.ids.extend(request.prompt)
    return message


def round_stats_from_proto(message: common_pb2.RoundStats) -> RoundStats:
    return RoundStats(
        k_chosen=message.k_chosen,
        drafted=message.drafted,
        accepted=message.accepted,
        committed=message.committed,
        draft_ms=message.draft_ms,
        verify_ms=message.verify_ms,
        transport_ms=message.transport_ms,
        controller_ms=message.controller_ms,
    )


def logprobs_from_proto(messages) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top)) for m in messages)


def usage_from_proto(message: controller_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens)


def speculation_from_proto(message: controller_pb2.SpeculationStats) -> SpeculationStats:
    return SpeculationStats(
        rounds=message.rounds,
        drafted=message.drafted,
        accepted=message.accepted,
        mean_accepted_tokens=message.mean_accepted_tokens,
        k_histogram=dict(sorted(message.k_histogram.items())),
        policy=message.policy,
    )


def final_stats_from_proto(message: controller_pb2.GenerationSummary) -> FinalStats:
    split = message.time_split
    return FinalStats(
        finish_reason=_FINISH_REASONS.get(message.finish_reason, FinishReason.UNSPECIFIED),
        usage=usage_from_proto(message.usage),
        speculation=speculation_from_proto(message.speculation),
        time_split=TimeSplit(
            draft_ms=split.draft_ms,
            verify_ms=split.verify_ms,
            transport_ms=split.transport_ms,
            controller_ms=split.controller_ms,
            total_ms=split.total_ms,
        ),
    )


def session_from_proto(message: controller_pb2.Session) -> SessionInfo:
    return SessionInfo(
        session_id=message.session_id,
        state=session_state_from_proto(message.state),
        finish_reason=_FINISH_REASONS.get(message.finish_reason, FinishReason.UNSPECIFIED),
        usage=usage_from_proto(message.usage),
        speculation=speculation_from_proto(message.speculation),
        drafter_id=message.drafter_id,
        verifier_id=message.verifier_id,
        committed_token_ids=tuple(message.committed_token_ids),
        error=session_error_from_proto(message.error) if message.HasField("error") else None,
    )


def session_error_from_proto(message: controller_pb2.SessionError) -> SessionError:
    code = next((c for c in grpc.StatusCode if c.value[0] == message.code), grpc.StatusCode.UNKNOWN)
    return SessionError(code=code, message=message.message)


def session_state_from_proto(value: int) -> SessionState:
    return _SESSION_STATES.get(value, SessionState.UNSPECIFIED)


class ResultBuilder:
    """Folds the messages of one Generate call, over all its attempts, into chunks and a GenerationResult.

    Each committed token is counted once: a resumed attempt starts with a catch-up chunk holding only the
    tokens this builder does not have yet (`completion_tokens` is what the resume request says it has).
    """

    def __init__(self, session_id: str | None = None, logprobs: bool = False) -> None:
        # The caller's choice, else the server's from the first message.
        self.session_id = session_id
        # The request set top_logprobs: chunks carry them.
        self.logprobs = logprobs
        self._logprobs: list[TokenLogprob | None] = []
        # A message arrived (so the server holds the session under `session_id`).
        self.streamed = False
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._rounds: list[RoundStats] = []
        self._stats: FinalStats | None = None

    @property
    def completion_tokens(self) -> int:
        """Generated tokens received so far."""
        return len(self._token_ids)

    @property
    def done(self) -> bool:
        """The summary arrived."""
        return self._stats is not None

    def add(self, message: controller_pb2.GenerateResponse, *, catch_up: bool = False) -> GenerationChunk | None:
        """Returns the chunk the message carries, or None for the summary.

        `catch_up`: the message opens a resumed request; a chunk is the catch-up chunk, yielded with
        `resumed` set when it holds tokens and dropped when the client had missed nothing. It may span
        several rounds, so its stats are not one round's and stay out of the result's `rounds`.
        """
        if self._stats is not None:
            raise ProtocolError("Generate stream sent a message after its summary")
        if message.session_id:
            if self.session_id and message.session_id != self.session_id:
                raise ProtocolError(
                    f"Generate stream of session {self.session_id!r} sent a message of {message.session_id!r}"
                )
            self.session_id = message.session_id
        self.streamed = True
        event = message.WhichOneof("event")
        if event == "summary":
            self._stats = final_stats_from_proto(message.summary)
            return None
        if event != "chunk":
            raise ProtocolError(f"Generate stream sent a message without an event: {message}")
        if catch_up and not message.chunk.token_ids and not message.chunk.text:
            return None
        logprobs = None
        if self.logprobs and not catch_up:
            logprobs = logprobs_from_proto(message.chunk.logprobs)
            if len(logprobs) != len(message.chunk.token_ids):
                raise ProtocolError(
                    f"Generate stream sent {len(logprobs)} log probabilities for {len(message.chunk.token_ids)} tokens"
                )
        chunk = GenerationChunk(
            session_id=self.session_id or "",
            round=message.chunk.round,
            token_ids=tuple(message.chunk.token_ids),
            text=message.chunk.text,
            stats=round_stats_from_proto(message.chunk.stats),
            resumed=catch_up,
            logprobs=logprobs,
        )
        self._token_ids.extend(chunk.token_ids)
        self._logprobs.extend(logprobs if logprobs is not None else [None] * len(chunk.token_ids))
        self._text.append(chunk.text)
        if not catch_up:
            self._rounds.append(chunk.stats)
        return chunk

    def result(self) -> GenerationResult:
        if self._stats is None:
            raise ProtocolError("Generate stream ended without a summary")
        return GenerationResult(
            session_id=self.session_id or "",
            token_ids=tuple(self._token_ids),
            text="".join(self._text),
            rounds=tuple(self._rounds),
            stats=self._stats,
            logprobs=tuple(self._logprobs) if self.logprobs else None,
        )
