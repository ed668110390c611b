"""Typed contracts between the stages of a round (docs/architecture.md §5.2), mirrored 1:1 by the internal protos.

Every message carries (session_id, round_index, base_length): the round number makes a retried message
idempotent and the base length says which committed prefix the node's KV cache must cover. Requests also
carry the owner token of the controller that drives the session: a node names the session by both (`key`).
"""

from dataclasses import dataclass, field

from eesd.params import NO_LOGPROBS, PolicyParams, SamplingParams, session_key


@dataclass(frozen=True)
class DraftRequest:
    session_id: str
    round_index: int
    base_length: int  # committed tokens the drafter's cache must cover before feeding `pending`
    pending: list[int]  # committed[base_length:]
    max_tokens: int  # cap from the remaining budget; the policy decides within it
    seed: int  # request seed; the round's randomness is derived from (seed, round_index)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policy: PolicyParams = field(default_factory=PolicyParams)
    policy_state: dict[str, float] = field(default_factory=dict)
    # What a round costs the caller per session outside the nodes' passes (its own work, the store, the
    # RPC hops): load-aware sizing counts it in a round's cost. A measurement, not part of the round's
    # identity: a lookahead's guess matches the controller's request whatever its value.
    round_overhead_s: float = field(default=0.0, compare=False)
    owner: str = ""
    top_logprobs: int = NO_LOGPROBS  # log probabilities the verdict carries (eesd.params.GenerationParams)

    @property
    def key(self) -> str:
        """The node's name for the session (eesd.params.session_key)."""
        return session_key(self.session_id, self.owner)

    def verify_request(self, block: "DraftBlock") -> "VerifyRequest":
        """The same round's request to the verifier, carrying the drafted block (the drafter relays it)."""
        return VerifyRequest(
            self.session_id,
            self.round_index,
            self.base_length,
            self.pending,
            block,
            self.seed,
            self.sampling,
            self.owner,
            self.top_logprobs,
        )


@dataclass(frozen=True)
class DraftBlock:
    """The k drafts of a round. q is shipped sparse (top-K ids and renormalised probs) when sampling."""

    tokens: list[int]
    confidences: list[float]  # q(d) of each draft: what threshold and Calibration-TS decide on
    q_ids: list[list[int]] | None = None  # (k, K) when sampling, None when greedy
    q_probs: list[list[float]] | None = None  # (k, K)
    budget: int = 0  # the policy's begin_round bound: the k chosen this round
    cache_length: int = 0  # the drafter's cache after drafting


@dataclass(frozen=True)
class VerifyRequest:
    session_id: str
    round_index: int
    base_length: int
    pending: list[int]
    draft: DraftBlock
    seed: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    owner: str = ""
    top_logprobs: int = NO_LOGPROBS  # NO_LOGPROBS: the verdict carries none; 0: each token's; n: and the top n

    @property
    def key(self) -> str:
        """The node's name for the session (eesd.params.session_key)."""
        return session_key(self.session_id, self.owner)


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token's log-probability under the verifier's target distribution p at its position
    (eesd/logprobs.py), and, when the request asked for them, the most likely entries of p there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first; entries with p = 0 left out


@dataclass(frozen=True)
class Verdict:
    session_id: str
    round_index: int
    accepted: int  # drafts kept
    next_token: int  # recovered (accepted < k) or bonus (accepted == k) token
    cache_length: int  # the verifier's cache after cropping: base + len(pending) + accepted
    # One per committed token (accepted + 1) when the request asked for log probabilities, else None.
    logprobs: tuple[TokenLogprob, ...] | None = None

    def committed_tokens(self, draft: DraftBlock) -> list[int]:
        """The accepted + 1 tokens this round commits."""
        return [*draft.tokens[: self.accepted], self.next_token]


@dataclass(frozen=True)
class RoundStats:
    round_index: int
    k_chosen: int
    drafted: int
    accepted: int
    committed: int
    draft_s: float
    verify_s: float
