"""The in-process engine: draft -> verify -> commit rounds on one drafter and one verifier.

The distributed controller runs the same round over gRPC; both keep only the committed tokens and the
policy state as hard state, and tell each node which committed prefix its cache must cover.
"""

import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from eesd.drafter import Drafter
from eesd.params import GenerationParams, validate_prompt
from eesd.policies import make_policy
from eesd.rounds import DraftBlock, DraftRequest, RoundStats, VerifyRequest
from eesd.verifier import Verifier


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    elapsed_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    k_histogram: Counter = field(default_factory=Counter)  # k chosen -> rounds
    accepted_at_position: Counter = field(default_factory=Counter)  # draft position (0-based) -> accepted
    drafted_at_position: Counter = field(default_factory=Counter)
    per_round: list[RoundStats] = field(default_factory=list)

    @property
    def mean_accepted_tokens(self) -> float:
        """tau: committed tokens per round, the recovered or bonus token included."""
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def add(self, stats: RoundStats) -> None:
        self.rounds += 1
        self.drafted += stats.drafted
        self.accepted += stats.accepted
        self.generated += stats.committed
        self.draft_s += stats.draft_s
        self.verify_s += stats.verify_s
        self.k_histogram[stats.k_chosen] += 1
        for position in range(stats.drafted):
            self.drafted_at_position[position] += 1
            self.accepted_at_position[position] += position < stats.accepted
        self.per_round.append(stats)

    def summary(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "generated": self.generated,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "tokens_per_second": self.tokens_per_second,
            "elapsed_s": self.elapsed_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "k_histogram": {str(k): v for k, v in sorted(self.k_histogram.items())},
            "acceptance_by_position": [
                self.accepted_at_position[i] / self.drafted_at_position[i] for i in sorted(self.drafted_at_position)
            ],
        }


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "eos" or "length"
    seed: int
    stats: GenerationStats


def finish(
    new_tokens: list[int], generated: int, params: GenerationParams, eos_token_ids: frozenset[int]
) -> tuple[list[int], str | None]:
    """Trims a round's tokens at EOS or the token budget; returns them and the finish reason, if any."""
    if params.stop_on_eos:
        for i, token in enumerate(new_tokens):
            if token in eos_token_ids:
                return new_tokens[: i + 1][: params.max_new_tokens - generated], "eos"
    room = params.max_new_tokens - generated
    return new_tokens[:room], ("length" if len(new_tokens) >= room else None)


class SpeculativeEngine:
    def __init__(self, drafter: Drafter | None, verifier: Verifier, eos_token_ids: frozenset[int] = frozenset()):
        if drafter is not None:
            drafter.identity.check_pairs_with(verifier.identity)
        self.drafter, self.verifier = drafter, verifier
        self.eos_token_ids = frozenset(eos_token_ids)

    def generate(
        self, prompt_ids: list[int], params: GenerationParams, on_tokens: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        params.validate()
        validate_prompt(prompt_ids, self.verifier.config.vocab_size)
        seed = params.sampling.seed if params.sampling.seed is not None else secrets.randbits(63)
        session = uuid.uuid4().hex
        speculate = self.drafter is not None and params.policy.name != "off"
        policy = make_policy(params.policy)
        committed, generated = list(prompt_ids), 0
        drafter_length = verifier_length = 0  # committed tokens each node's cache covers
        stats, start, finish_reason = GenerationStats(), time.perf_counter(), None
        try:
            while finish_reason is None:
                round_index, t0 = stats.rounds, time.perf_counter()
                block = DraftBlock([], [])
                # Every round commits one token past the drafts, so draft at most remaining - 1.
                room = params.max_new_tokens - generated - 1
                if speculate and room > 0:
                    block = self.drafter.propose(
                        DraftRequest(
                            session,
                            round_index,
                            drafter_length,
                            committed[drafter_length:],
                            room,
                            seed,
                            params.sampling,
                            params.policy,
                            policy.state(),
                        )
                    )
                t1 = time.perf_counter()
                verdict = self.verifier.verify(
                    VerifyRequest(
                        session, round_index, verifier_length, committed[verifier_length:], block, seed, params.sampling
                    )
                )
                t2 = time.perf_counter()
                if block.tokens:
                    policy.update(block.confidences, verdict.accepted)
                    drafter_length = min(block.cache_length, len(committed) + verdict.accepted)
                verifier_length = verdict.cache_length
                new_tokens, finish_reason = finish(
                    verdict.committed_tokens(block), generated, params, self.eos_token_ids
                )
                committed += new_tokens
                generated += len(new_tokens)
                stats.add(
                    RoundStats(
                        round_index,
                        block.budget,
                        len(block.tokens),
                        verdict.accepted,
                        len(new_tokens),
                        t1 - t0,
                        t2 - t1,
                    )
                )
                if on_tokens is not None:
                    on_tokens(new_tokens)
        finally:
            for node in (self.drafter, self.verifier):
                if node is not None:
                    node.sessions.close(session)
        stats.elapsed_s = time.perf_counter() - start
        return GenerationResult(committed[len(prompt_ids) :], finish_reason, seed, stats)
