"""Speculation that knows the load: the marginal cost of a draft token, from pass times the nodes measure.

A forward pass over T tokens (summed over the sessions batched in it) costs about fixed + per_token * T:
`fixed` is what a pass costs whatever it holds (weights read once, per-op overhead), `per_token` the
arithmetic each token adds. A session's round with k drafts takes its share of one verify pass plus k+1
tokens in it, and k draft steps, each a share of a drafter step plus one token in it. Per session, with
B sessions per verify pass and B_d per draft step:

    cost(k) = round + k * draft,   round = fixed_v / B + per_token_v + overhead,
                                   draft = per_token_v + fixed_d / B_d + per_token_d

where `overhead` is what a round costs its caller per session outside the passes (the engine's or the
controller's own work, the state store, the RPC hops), measured there and sent with the round: it is paid
once per round whatever k, so it is what keeps drafting worth it on a machine where passes are cheap

and the round commits tau(theta, k) = (1 - theta^(k+1)) / (1 - theta) tokens, so the throughput-optimal k
maximises tau(theta, k) / (1 + rho * k) with rho = draft / round (`draft_cost_ratio`). An idle verifier
(B = 1, fixed_v large) makes rho small and drafts pay; a full one (fixed_v / B -> 0) makes rho >= 1, where
no k > 0 beats k = 0 since tau(theta, k) < k + 1: speculation backs off by itself and returns when the
batch empties. k > 0 pays at all only when theta > rho (compare k = 1 with k = 0).
"""

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW = 64  # recent passes a node fits its costs on: a few seconds of traffic, so load changes show fast


@dataclass(frozen=True)
class PassCost:
    """Seconds of one forward pass: fixed_s + per_token_s * tokens."""

    fixed_s: float
    per_token_s: float


def fit_pass_cost(samples: Sequence[tuple[int, float]]) -> PassCost | None:
    """Least-squares line through (tokens, seconds) samples, clamped to non-negative parts; None until the
    samples hold two different token counts (one point fixes no slope)."""
    if len({tokens for tokens, _ in samples}) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_s = sum(s for _, s in samples) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    slope = max(0.0, sum((t - mean_t) * (s - mean_s) for t, s in samples) / var_t)
    return PassCost(max(0.0, mean_s - slope * mean_t), slope)


@dataclass(frozen=True)
class NodeLoad:
    """What a node reports: its pass cost and how many sessions and tokens its recent passes held."""

    cost: PassCost
    rows_per_pass: float


class PassTimer:
    """A node's recent passes (tokens, rows, seconds); `load()` fits them. Not thread-safe on purpose: one
    compute thread records, and readers take a snapshot (a deque copy) that a concurrent append cannot
    corrupt in CPython."""

    def __init__(self, window: int = WINDOW):
        self._passes: deque[tuple[int, int, float]] = deque(maxlen=window)

    def record(self, tokens: int, rows: int, seconds: float) -> None:
        self._passes.append((tokens, rows, seconds))

    def load(self) -> NodeLoad | None:
        passes = list(self._passes)
        cost = fit_pass_cost([(tokens, seconds) for tokens, _, seconds in passes])
        if cost is None:
            return None
        return NodeLoad(cost, sum(rows for _, rows, _ in passes) / len(passes))


class Ewma:
    """An exponentially weighted mean of a measurement (None before the first)."""

    def __init__(self, weight: float = 0.1):
        self.weight, self.value = weight, None

    def add(self, sample: float) -> None:
        if math.isfinite(sample):
            self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


def draft_cost_ratio(verifier: NodeLoad, drafter: NodeLoad, round_overhead_s: float = 0.0) -> float:
    """rho: the cost of one more draft token over the cost of a round that drafts none, per session.
    `round_overhead_s` is what a round costs the caller per session outside the nodes' passes."""
    round_cost = verifier.cost.fixed_s / max(verifier.rows_per_pass, 1.0) + verifier.cost.per_token_s
    round_cost += round_overhead_s
    draft = (
        verifier.cost.per_token_s + drafter.cost.fixed_s / max(drafter.rows_per_pass, 1.0) + drafter.cost.per_token_s
    )
    return draft / round_cost if round_cost > 0 else 0.0
