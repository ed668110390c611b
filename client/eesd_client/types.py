"""Typed results and requests of the client SDK; each mirrors a message of eesd/v1/controller.proto."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TypedDict

import grpc

from eesd_client.errors import InvalidArgumentError


class Policy(StrEnum):
    """Draft-length policies the server ships; `GenerationRequest.policy` also takes any other name."""

    BETA_TS = "beta-ts"
    CALIBRATION_TS = "calibration-ts"
    FIXED = "fixed"
    HEURISTIC = "heuristic"
    THRESHOLD = "threshold"
    OFF = "off"


class FinishReason(Enum):
    """Why generation stopped (FinishReason)."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    EOS = "eos"
    CANCELLED = "cancelled"
    # A stop string or stop token id of the request was generated.
    STOP = "stop"


# The most top_logprobs a request may ask for (the server's bound).
MAX_TOP_LOGPROBS = 20


class SessionState(Enum):
    """Lifecycle state of a session (SessionState)."""

    UNSPECIFIED = "unspecified"
    ACTIVE = "active"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationRequest:
    """Parameters of one Generate call (GenerateRequest); validated on construction."""

    # Prompt text (tokenized by the server) or token ids of the served model's tokenizer.
    prompt: str | Sequence[int]
    max_new_tokens: int = 128
    # 0 is greedy decoding.
    temperature: float = 0.0
    # 0 disables top-k filtering.
    top_k: int = 0
    # 1 disables nucleus filtering.
    top_p: float = 1.0
    seed: int | None = None
    # None lets the server choose.
    policy: Policy | str | None = None
    # Policy knobs, e.g. {"k": 4} for Policy.FIXED, {"threshold": 0.4} for Policy.THRESHOLD.
    policy_options: Mapping[str, float] = field(default_factory=dict)
    # Upper bound on drafts per round (0: no speculation); None lets the server choose.
    k_max: int | None = None
    # Client-chosen id, so the session can be cancelled before its first token arrives; a retry after a
    # lost first attempt then resumes that session instead of starting another.
    session_id: str | None = None
    stop_on_eos: bool = True
    # Stop strings (at most 16, 1 to 256 characters each): the text ends where the first one generated
    # begins, finish reason STOP. Text that may begin one is held back until the next round shows whether
    # it does, so a chunk's text can lag its token ids.
    stop: str | Sequence[str] = ()
    # Stop token ids (at most 64): the first one generated is the last token, finish reason STOP.
    stop_token_ids: Sequence[int] = ()
    # Log probabilities of the generated tokens (`GenerationChunk.logprobs`): None asks for none; 0 for each
    # token's own; n (at most 20) also for the n most likely tokens at its position.
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidArgumentError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidArgumentError("stop_token_ids must be token ids >= 0")
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise InvalidArgumentError("prompt is empty")
        elif not self.prompt or any(not isinstance(t, int) or t < 0 for t in self.prompt):
            raise InvalidArgumentError("prompt must be text or a non-empty sequence of token ids >= 0")
        if self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgumentError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.k_max is not None and self.k_max < 0:
            raise InvalidArgumentError(f"k_max must be >= 0, got {self.k_max}")
        if self.top_logprobs is not None and (
            not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise InvalidArgumentError(
                f"top_logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` / `generate_text`: the fields of GenerationRequest but the prompt."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    policy: Policy | str | None
    policy_options: Mapping[str, float]
    k_max: int | None
    session_id: str | None
    stop_on_eos: bool
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    top_logprobs: int | None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (TokenLogprob) under the verifier's target distribution p at its
    position: after the request's temperature, top-k and top-p when sampling, the model's raw softmax
    when greedy; never the drafter's, so speculation does not change it."""

    token_id: int
    logprob: float
    # The request's top_logprobs most likely (token id, logprob) of p at the position, most likely first;
    # tokens with p = 0 (cut by top-k / top-p) left out.
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RoundStats:
    """Measurements of one round (RoundStats)."""

    k_chosen: int
    drafted: int
    accepted: int
    # Tokens the round committed: accepted + 1, fewer when max_new_tokens or EOS cut it.
    committed: int
    draft_ms: float
    verify_ms: float
    transport_ms: float
    controller_ms: float


@dataclass(frozen=True)
class GenerationChunk:
    """Tokens one round committed: the accepted drafts plus the recovered or bonus token."""

    session_id: str
    round: int
    token_ids: tuple[int, ...]
    # Text delta; may be empty while a multi-byte character is incomplete.
    text: str
    stats: RoundStats
    # The catch-up chunk of a resumed stream: every token the session committed while the stream was down,
    # possibly several rounds, so `round` and `stats` are what the server reported for it, not one round's.
    resumed: bool = False
    # One per token of token_ids when the request set top_logprobs, else None; None in a catch-up chunk too
    # (the server does not store log probabilities).
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts of a session."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SpeculationStats:
    """Speculation statistics of a session."""

    rounds: int
    drafted: int
    accepted: int
    # tau: committed tokens per round, including the recovered or bonus token.
    mean_accepted_tokens: float
    # Rounds per chosen draft length k.
    k_histogram: Mapping[int, int]
    policy: str


@dataclass(frozen=True)
class TimeSplit:
    """Where a session's time went, in milliseconds."""

    draft_ms: float
    verify_ms: float
    transport_ms: float
    controller_ms: float
    total_ms: float


@dataclass(frozen=True)
class FinalStats:
    """The summary that ends a Generate stream."""

    finish_reason: FinishReason
    usage: Usage
    speculation: SpeculationStats
    time_split: TimeSplit


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation: every committed token, the text and the final statistics."""

    session_id: str
    token_ids: tuple[int, ...]
    text: str
    # Stats of the rounds streamed live, in order; a resumed stream's catch-up chunk adds none (the rounds
    # it spans arrived as one chunk), while `stats.speculation` always covers every round.
    rounds: tuple[RoundStats, ...]
    stats: FinalStats
    # When the request set top_logprobs: one per token of token_ids, None for a token that arrived in a
    # resumed stream's catch-up chunk; None when the request asked for none.
    logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finish_reason(self) -> FinishReason:
        return self.stats.finish_reason


@dataclass(frozen=True)
class SessionError:
    """The status a failed session's stream ended with (SessionError)."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class SessionInfo:
    """State and statistics of a session (Session)."""

    session_id: str
    state: SessionState
    finish_reason: FinishReason
    usage: Usage
    speculation: SpeculationStats
    drafter_id: str
    verifier_id: str
    # Prompt + generated tokens; empty unless requested.
    committed_token_ids: tuple[int, ...]
    # Set only when state is FAILED.
    error: SessionError | None = None
