"""One session's round transition, written once (torch-free): the in-process engine, the controller and the
drafter's lookahead all call it; they only add I/O (model calls, gRPC, the state store).

A round (docs/architecture.md §3): the session asks its drafter for a block (`draft_request`) or, when it
does not speculate, its verifier for one token (`verify_request`); the verdict is settled into a
`RoundResult` (the tokens it commits after EOS / length trimming, the policy's new state, both nodes'
cache lengths, the round's stats) without changing the session, so that the controller can write the
result to its store first; `apply` then makes it the session's state.
"""

from dataclasses import dataclass, field, replace

from eesd.errors import FailedPrecondition
from eesd.generation import GenerationStats, finish
from eesd.params import NO_LOGPROBS, GenerationParams, PolicyParams, session_key
from eesd.policies import make_policy
from eesd.rounds import DraftBlock, DraftRequest, RoundStats, TokenLogprob, Verdict, VerifyRequest

NO_DRAFT = DraftBlock([], [])


def speculates(policy: PolicyParams) -> bool:
    """Whether a session under this policy ever drafts (k_max = 0 is speculation off, whatever the name)."""
    return policy.name != "off" and policy.k_max > 0


def reproducible(params: GenerationParams) -> GenerationParams:
    """`params` without load awareness when a client seed asks for a reproducible sampled run: the k of a
    load-aware policy depends on the load, and a sampled round's draws on its k, so a seeded run would
    depend on what it was batched with. Greedy runs do not depend on k (lossless), so they keep it."""
    policy = params.policy
    if params.sampling.greedy or params.sampling.seed is None or not policy.options.get("load_aware"):
        return params
    options = {name: value for name, value in policy.options.items() if name != "load_aware"}
    return replace(params, policy=replace(policy, options=options))


def policy_after(policy: PolicyParams, state: dict[str, float], block: DraftBlock, accepted: int) -> dict[str, float]:
    """The policy's state once it learned that `accepted` of `block`'s drafts were kept."""
    if not block.tokens:
        return state
    learner = make_policy(policy, state)
    learner.update(block.confidences, accepted)
    return learner.state()


def drafter_cache_after(block: DraftBlock, fed_length: int, accepted: int) -> int:
    """Committed tokens the drafter's cache covers after a verdict: what it fed before drafting (base +
    pending) plus the accepted drafts it has fed (the last draft is fed only by a lookahead)."""
    return min(block.cache_length, fed_length + accepted)


@dataclass(frozen=True)
class RoundResult:
    """What one verdict does to a session; `Session.apply` makes it so."""

    tokens: list[int]  # committed this round, after EOS / length trimming
    finish_reason: str | None  # "eos" or "length" when this round ends the session
    policy_state: dict[str, float]
    verifier_length: int
    drafter_length: int
    stats: RoundStats
    # Log probabilities of `tokens`, trimmed with them; None when the request asked for none.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class Session:
    session_id: str
    committed: list[int]  # prompt + generated tokens: the session's hard state
    prompt_length: int
    params: GenerationParams
    seed: int  # every round's randomness derives from (seed, round_index)
    policy_state: dict[str, float]
    eos_token_ids: frozenset[int] = frozenset()
    drafter_length: int = 0  # committed tokens the drafter's cache covers
    verifier_length: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    owner: str = ""  # the driving controller's token on node calls (eesd.params.session_key)

    @classmethod
    def start(
        cls,
        session_id: str,
        prompt_ids: list[int],
        params: GenerationParams,
        seed: int,
        eos_token_ids=frozenset(),
        owner: str = "",
    ) -> "Session":
        params = reproducible(params)
        state = make_policy(params.policy).state()
        return cls(
            session_id, list(prompt_ids), len(prompt_ids), params, seed, state, frozenset(eos_token_ids), owner=owner
        )

    @classmethod
    def resume(
        cls,
        session_id: str,
        committed: list[int],
        prompt_length: int,
        params: GenerationParams,
        seed: int,
        policy_state: dict[str, float],
        rounds: int,
        eos_token_ids=frozenset(),
        owner: str = "",
    ) -> "Session":
        """A session that already ran `rounds` rounds (under another controller, or before a failure), from
        its stored state: the next round is the one it would have run, with the same randomness."""
        params = reproducible(params)
        session = cls(
            session_id, list(committed), prompt_length, params, seed, dict(policy_state), frozenset(eos_token_ids)
        )
        session.owner = owner
        session.stats.rounds, session.stats.generated = rounds, len(session.generated)
        generated = session.generated
        # As `finish` decides at the end of a round: EOS first (it was within the budget), then the budget.
        if params.stop_on_eos and generated and generated[-1] in session.eos_token_ids:
            session.finish_reason = "eos"
        elif generated and generated[-1] in params.stop.token_ids:
            session.finish_reason = "stop"
        elif len(generated) >= params.max_new_tokens:
            session.finish_reason = "length"
        return session

    @property
    def key(self) -> str:
        """The nodes' name for the session."""
        return session_key(self.session_id, self.owner)

    @property
    def round_index(self) -> int:
        return self.stats.rounds

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_length :]

    @property
    def speculates(self) -> bool:
        return speculates(self.params.policy)

    @property
    def draft_room(self) -> int:
        """Most drafts this round may hold: every round commits one token past its drafts."""
        return self.params.max_new_tokens - len(self.generated) - 1 if self.speculates else 0

    def draft_request(self, base: int, round_overhead_s: float = 0.0) -> DraftRequest:
        """This round's request to a drafter whose cache covers (at least) `base` committed tokens;
        `round_overhead_s` is the caller's measured cost of a round outside the passes."""
        return DraftRequest(
            self.session_id,
            self.round_index,
            base,
            self.committed[base:],
            self.draft_room,
            self.seed,
            self.params.sampling,
            self.params.policy,
            self.policy_state,
            round_overhead_s,
            self.owner,
            self.params.top_logprobs,
        )

    def verify_request(self, base: int, block: DraftBlock = NO_DRAFT) -> VerifyRequest:
        """This round's request to a verifier whose cache covers `base` committed tokens."""
        return VerifyRequest(
            self.session_id,
            self.round_index,
            base,
            self.committed[base:],
            block,
            self.seed,
            self.params.sampling,
            self.owner,
            self.params.top_logprobs,
        )

    def settle(
        self, block: DraftBlock, verdict: Verdict, drafter_length: int | None, draft_s: float, verify_s: float
    ) -> RoundResult:
        """The result of this round's verdict on `block`; `drafter_length` is what the drafter's cache covers
        after it, None when no drafter took part (a verifier-only round: that cache did not move)."""
        logprobs = verdict.logprobs
        if self.params.top_logprobs != NO_LOGPROBS and (logprobs is None or len(logprobs) != verdict.accepted + 1):
            # A verifier that predates log probabilities ignores the request's field: say so, never send
            # tokens without them.
            raise FailedPrecondition(
                f"the verifier sent {len(logprobs or ())} log probabilities for {verdict.accepted + 1} tokens "
                "(it does not serve top_logprobs)"
            )
        tokens, finish_reason = finish(
            verdict.committed_tokens(block), len(self.generated), self.params, self.eos_token_ids
        )
        stats = RoundStats(
            self.round_index, block.budget, len(block.tokens), verdict.accepted, len(tokens), draft_s, verify_s
        )
        return RoundResult(
            tokens,
            finish_reason,
            policy_after(self.params.policy, self.policy_state, block, verdict.accepted),
            verdict.cache_length,
            self.drafter_length if drafter_length is None else drafter_length,
            stats,
            None if self.params.top_logprobs == NO_LOGPROBS else logprobs[: len(tokens)],
        )

    def apply(self, result: RoundResult) -> None:
        self.committed += result.tokens
        self.policy_state = result.policy_state
        self.verifier_length, self.drafter_length = result.verifier_length, result.drafter_length
        self.stats.add(result.stats)
        self.finish_reason = result.finish_reason


def next_draft_request(request: DraftRequest, block: DraftBlock, bonus: int) -> DraftRequest | None:
    """Round r+1's draft request if round r (`request`, `block`) is accepted whole and commits `bonus`
    after it; None when round r+1 will not draft. The same transition as `Session.settle` + `apply` +
    `draft_request`, seen from the drafter, which holds the request but not the committed tokens."""
    committed = len(block.tokens) + 1
    room = request.max_tokens - committed
    if room <= 0:
        return None
    return replace(
        request,
        round_index=request.round_index + 1,
        base_length=request.base_length + len(request.pending) + len(block.tokens),  # all but the bonus
        pending=[bonus],
        max_tokens=room,
        policy_state=policy_after(request.policy, request.policy_state, block, len(block.tokens)),
    )
