"""Speculation that knows the load: the marginal cost of a draft token, from pass times the nodes measure.

A forward pass over R sessions' rows holding T tokens in all costs about fixed + per_row * R + per_token * T:
`fixed` is what a pass costs whatever it holds (weights read once, per-op overhead), `per_row` what each
session's row adds whatever its length (its own context read by attention, its bookkeeping), `per_token`
the arithmetic each token adds. Rows and tokens are fitted apart because a draft adds a token to its
session's row, not a row: a line through tokens alone charges drafts the rows' cost as well whenever the
passes it sees hold more rows when they hold more tokens, and misprices them when they do not. A session's
round with k drafts takes its share of one verify pass, its row and k+1 tokens in it, and k draft steps,
each a share of a drafter step plus one row of one token in it. Per session, with B sessions per verify
pass and B_d per draft step:

    cost(k) = round + k * draft,   round = fixed_v / B + per_row_v + per_token_v + overhead,
                                   draft = per_token_v + fixed_d / B_d + per_row_d + per_token_d

where `overhead` is what a round costs its caller per session outside the passes (the engine's or the
controller's own work, the state store, the RPC hops), measured there and sent with the round: it is paid
once per round whatever k, so it is what keeps drafting worth it on a machine where passes are cheap

and the round commits tau(theta, k) = (1 - theta^(k+1)) / (1 - theta) tokens, so the throughput-optimal k
maximises tau(theta, k) / (1 + rho * k) with rho = draft / round (`draft_cost_ratio`). An idle verifier
(B = 1, fixed_v large) makes rho small and drafts pay; a full one (fixed_v / B -> 0) makes rho grow
towards and past 1, where no k > 0 beats k = 0 since tau(theta, k) < k + 1: speculation backs off by
itself and returns when the batch empties. k > 0 pays at all only when theta > rho (compare k = 1 with
k = 0).
"""

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW = 64  # recent passes a node fits its costs on: a few seconds of traffic, so load changes show fast


@dataclass(frozen=True)
class PassCost:
    """Seconds of one forward pass: fixed_s + per_row_s * rows + per_token_s * tokens."""

    fixed_s: float
    per_token_s: float
    per_row_s: float = 0.0


def fit_pass_cost(samples: Sequence[tuple[int, int, float]]) -> PassCost | None:
    """Least-squares plane through (tokens, rows, seconds) samples, every part non-negative; None until the
    samples hold two different token counts (one point fixes no slope). Where rows and tokens do not vary
    apart (every pass held the same rows, or one token per row), the rows' part cannot be told from the
    rest: it stays in `fixed` or `per_token`, as in a line through tokens alone."""
    if len({tokens for tokens, _, _ in samples}) < 2:
        return None
    mean_t, mean_r, mean_s = (sum(sample[i] for sample in samples) / len(samples) for i in range(3))
    t = [tokens - mean_t for tokens, _, _ in samples]
    r = [rows - mean_r for _, rows, _ in samples]
    s = [seconds - mean_s for _, _, seconds in samples]
    rr, tt, rt, rs, ts = _dot(r, r), _dot(t, t), _dot(r, t), _dot(r, s), _dot(t, s)
    det = rr * tt - rt * rt
    per_row, per_token = 0.0, max(0.0, ts / tt)  # the line through tokens alone
    if det > 1e-9 * rr * tt:  # rows and tokens vary apart
        per_row, per_token = (rs * tt - ts * rt) / det, (ts * rr - rs * rt) / det
        if per_token < 0:  # noise never makes tokens free money
            per_row, per_token = max(0.0, rs / rr), 0.0
        elif per_row < 0:
            per_row, per_token = 0.0, max(0.0, ts / tt)
    return PassCost(max(0.0, mean_s - per_row * mean_r - per_token * mean_t), per_token, per_row)


def _dot(x: Sequence[float], y: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


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
        cost = fit_pass_cost(passes)
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
    v, d = verifier.cost, drafter.cost
    round_cost = v.fixed_s / max(verifier.rows_per_pass, 1.0) + v.per_row_s + v.per_token_s + round_overhead_s
    draft = v.per_token_s + d.fixed_s / max(drafter.rows_per_pass, 1.0) + d.per_row_s + d.per_token_s
    return draft / round_cost if round_cost > 0 else 0.0
