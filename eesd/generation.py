"""Per-request generation results and statistics; torch-free, shared by the engine and the controller."""

from collections import Counter
from dataclasses import dataclass, field

from eesd.params import GenerationParams
from eesd.rounds import RoundStats


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

    def speculation(self, policy: str) -> dict:
        """What a session's record keeps of its speculation (JSON-able): GetSession on any replica reads it."""
        return {
            "policy": policy,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "generated": self.generated,
            "k_histogram": {str(k): n for k, n in sorted(self.k_histogram.items())},
        }

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
    """Trims a round's tokens at EOS, a stop token id or the token budget; returns them and the finish
    reason, if any ("eos", "stop", "length"; stop strings are found on the text, eesd/stops.py).

    The budget is applied first: an EOS beyond it was never generated, so the reason is then "length".
    """
    room = params.max_new_tokens - generated
    kept = new_tokens[:room]
    stop_ids = params.stop.token_ids
    if params.stop_on_eos or stop_ids:
        for i, token in enumerate(kept):
            if params.stop_on_eos and token in eos_token_ids:
                return kept[: i + 1], "eos"
            if token in stop_ids:
                return kept[: i + 1], "stop"
    return kept, ("length" if len(new_tokens) >= room else None)
