"""Draft-length policies (docs/architecture.md §7): how many tokens to draft each round.

A policy decides in two steps, both on the drafter as it drafts: `begin_round` gives the most tokens
this round may draft, `keep_drafting` is asked after every drafted token with the drafter's confidence
q(d) in it. `update` learns from the verdict. State is a flat map of floats (a Redis hash).
Randomness comes from the caller's `random.Random`, so a seeded round decides the same everywhere.
"""

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from eesd.errors import InvalidArgument
from eesd.params import PolicyParams


def bounded(default: float, low: float, high: float, integer: bool = False):
    """A policy knob with the range a request (option) or a stored state may set it to: anything else is
    INVALID_ARGUMENT, so no NaN, infinity or absurd size ever reaches the policy's math (a NaN Beta
    parameter would make `random.betavariate` loop forever)."""
    return field(default=default, metadata={"bounds": (low, high, integer)})


def check_bounded(name: str, value: float, bounds: tuple[float, float, bool]) -> None:
    low, high, integer = bounds
    if not isinstance(value, int | float) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(name, f"must be a finite number in [{low:g}, {high:g}], got {value!r}")
    if integer and value != int(value):
        raise InvalidArgument(name, f"must be a whole number, got {value!r}")


POSTERIOR = (1e-3, 1e9)  # Beta parameters: positive, and far below where floats lose whole counts


@dataclass
class DraftPolicy:
    k_max: int = 8

    name = ""

    def begin_round(self, rng: random.Random) -> int:
        """Upper bound on the drafts of this round (0: no speculation)."""
        return self.k_max

    def keep_drafting(self, drafted: int, confidence: float, rng: random.Random) -> bool:
        """After the `drafted`-th draft token, whose draft probability was `confidence`."""
        return True

    def load_sized_theta(self, rng: random.Random) -> float | None:
        """This round's acceptance draw, for a policy whose block size follows the measured load (None for
        the others): a batch drafting in lock step then sizes one block for all its sessions (best_block)."""
        return None

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """Learns from one verdict: `accepted` of the drafts with these confidences were kept."""

    def state(self) -> dict[str, float]:
        return {}

    def load_state(self, state: dict[str, float]) -> None:
        """Restores what `state` returned; unknown keys and values out of their knob's range are refused."""
        unknown = set(state) - set(self.state())
        if unknown:
            raise InvalidArgument("policy_state", f"unknown keys for {self.name}: {sorted(unknown)}")
        for key, value in state.items():
            check_bounded(f"policy_state.{key}", value, self._state_bounds(key))
        self._load(state)

    def _state_bounds(self, key: str) -> tuple[float, float, bool]:
        return next(f.metadata["bounds"] for f in fields(self) if f.name == key)

    def _load(self, state: dict[str, float]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class NoSpeculation(DraftPolicy):
    name = "off"

    def begin_round(self, rng: random.Random) -> int:
        return 0


@dataclass
class FixedK(DraftPolicy):
    """Always drafts min(k, k_max) tokens."""

    k: int = bounded(4, 0, 64, integer=True)
    name = "fixed"

    def begin_round(self, rng: random.Random) -> int:
        return int(min(self.k, self.k_max))


@dataclass
class Heuristic(DraftPolicy):
    """transformers' assisted-generation schedule: +2 after a fully accepted block, -1 otherwise."""

    k_current: float = bounded(4.0, 1, 64)
    name = "heuristic"

    def begin_round(self, rng: random.Random) -> int:
        return min(int(self.k_current), self.k_max)

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        if accepted == len(confidences):
            self.k_current = min(self.k_current + 2, self.k_max)
        else:
            self.k_current = max(1.0, self.k_current - 1)

    def state(self) -> dict[str, float]:
        return {"k_current": self.k_current}


@dataclass
class ConfidenceThreshold(DraftPolicy):
    """Stops after a draft whose own probability falls below `threshold`."""

    threshold: float = bounded(0.4, 0, 1)
    name = "threshold"

    def keep_drafting(self, drafted: int, confidence: float, rng: random.Random) -> bool:
        return confidence >= self.threshold


def verdict_evidence(judged: int, accepted: int) -> tuple[float, float]:
    """(successes, failures) of a verdict on `judged` drafts, `accepted` kept. Drafts are judged in order
    until the first rejection, so the likelihood is theta^a (1-theta)^[a<L]."""
    return float(accepted), 1.0 if accepted < judged else 0.0


def posterior_update(alpha: float, beta: float, judged: int, accepted: int, discount: float) -> tuple[float, float]:
    """Beta posterior of a per-token acceptance probability after `judged` drafts, `accepted` of them kept
    (verdict_evidence); `discount` < 1 forgets old evidence geometrically for drifting acceptance."""
    low = POSTERIOR[0]  # a discounted posterior never decays below the smallest legal parameter
    successes, failures = verdict_evidence(judged, accepted)
    return max(low, discount * alpha + successes), max(low, discount * beta + failures)


def expected_committed(theta: float, k: int) -> float:
    """tau of a block of k drafts at per-token acceptance theta: (1 - theta^(k+1)) / (1 - theta)."""
    return float(k + 1) if theta >= 1.0 else (1.0 - theta ** (k + 1)) / (1.0 - theta)


# Pseudo-counts of the pooled verdicts in a load-sized draw: about one whole request's own evidence (16
# rounds of ~4 judged drafts), so a new session starts from what its node pair knows and its own verdicts
# take over as they come.
POOLED_WEIGHT = 64.0


class VerdictPool:
    """The verdicts of a node pair's recent session-rounds, pooled: what the sessions batched together know
    about how their drafts fare. A new session's own posterior is flat, so on its own evidence it draws
    anything from k = 0 to k_max for its first rounds: a lock-step batch would wait for the largest draw,
    and sessions batched through the services would spread their blocks (and the verifier's passes) for
    no gain. `prior(weight)` is the pool's acceptance rate as `weight` pseudo-counts (accepted, rejected),
    which load-sized draws add to each session's own posterior (which stays the session's, as stored)."""

    def __init__(self, window: int = 64):
        self._verdicts: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, judged: int, accepted: int) -> None:
        """A verdict on `judged` drafts, `accepted` kept, counted as a session's posterior counts it."""
        if judged > 0:
            self._verdicts.append(verdict_evidence(judged, accepted))

    def prior(self, weight: float = POOLED_WEIGHT) -> tuple[float, float]:
        if not self._verdicts:
            return 0.0, 0.0
        accepted = sum(a for a, _ in self._verdicts)
        rate = (1.0 + accepted) / (2.0 + accepted + sum(r for _, r in self._verdicts))
        return weight * rate, weight * (1.0 - rate)


def best_block(thetas: Sequence[float], draft_cost: float, k_max: int, smallest: int = 1) -> int:
    """The k in smallest..k_max maximising expected tokens per unit of cost when every session of `thetas`
    drafts k: sum_i tau(theta_i, k) / (1 + draft_cost * k). One session, or a batch drafting in lock step
    (whose draft steps last as long as its longest block, so one k for all wastes no step). With
    smallest = 0, no speculation is a choice too (for one session it wins whenever theta <= draft_cost)."""

    def value(k: int) -> float:
        return sum(expected_committed(theta, k) for theta in thetas) / (1.0 + draft_cost * k)

    return max(range(smallest, k_max + 1), key=value) if k_max else 0


@dataclass
class BetaTS(DraftPolicy):
    """Thompson sampling over one Beta posterior of the per-token acceptance probability."""

    alpha: float = bounded(1.0, *POSTERIOR)
    beta: float = bounded(1.0, *POSTERIOR)
    per_token: float = bounded(0.0, 0, 1)  # 1: draw theta after every token instead of once per round
    discount: float = bounded(1.0, 0.01, 1)
    # > 0: cost-aware instead of the Bernoulli stopping rule: the round drafts the k that maximises
    # tau(theta, k) / (1 + draft_cost * k) for the sampled theta (draft_cost: one draft step / one verify pass).
    draft_cost: float = bounded(0.0, 0, 100)
    # 1: the same rule with the cost the nodes measure now (eesd.load.draft_cost_ratio), k = 0 included, so
    # speculation backs off as the batch fills; until a measurement exists, the configured rule applies.
    load_aware: float = bounded(0.0, 0, 1)
    measured_cost: float | None = None  # set by the drafter from its measurements, never by a request
    # The node pair's recent verdicts as pseudo-counts (VerdictPool.prior), added to a load-sized draw; set
    # like measured_cost.
    pooled: tuple[float, float] = (0.0, 0.0)
    name = "beta-ts"

    def __post_init__(self) -> None:
        self._theta = 0.0

    @property
    def _sized_by_cost(self) -> bool:
        return self.draft_cost > 0 or self._sized_by_load

    @property
    def _sized_by_load(self) -> bool:
        return bool(self.load_aware and self.measured_cost is not None)

    def begin_round(self, rng: random.Random) -> int:
        if self._sized_by_load:
            return best_block((self.load_sized_theta(rng),), self.measured_cost, self.k_max, smallest=0)
        self._theta = rng.betavariate(self.alpha, self.beta)
        if self.draft_cost > 0:
            return best_block((self._theta,), self.draft_cost, self.k_max)
        return self.k_max

    def load_sized_theta(self, rng: random.Random) -> float | None:
        if not self._sized_by_load:
            return None
        # the pooled counts on top of the session's own posterior
        self._theta = rng.betavariate(self.alpha + self.pooled[0], self.beta + self.pooled[1])
        return self._theta

    def keep_drafting(self, drafted: int, confidence: float, rng: random.Random) -> bool:
        if self._sized_by_cost:
            return True  # begin_round bounded the block
        theta = rng.betavariate(self.alpha, self.beta) if self.per_token else self._theta
        return rng.random() < theta

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        self.alpha, self.beta = posterior_update(self.alpha, self.beta, len(confidences), accepted, self.discount)

    def state(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta}


def confidence_bucket(confidence: float, buckets: int) -> int:
    return min(int(confidence * buckets), buckets - 1)


@dataclass
class CalibrationTS(DraftPolicy):
    """Thompson sampling with one Beta posterior per bucket of the draft's own confidence q(d)."""

    buckets: int = bounded(10, 1, 64, integer=True)
    prior_alpha: float = bounded(1.0, *POSTERIOR)
    prior_beta: float = bounded(1.0, *POSTERIOR)
    discount: float = bounded(1.0, 0.01, 1)
    min_accept: float = bounded(0.0, 0, 1)  # > 0: the cost-aware rule of keep_drafting instead of the Bernoulli draw
    name = "calibration-ts"
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buckets = int(self.buckets)
        self.alphas = self.alphas or [self.prior_alpha] * self.buckets
        self.betas = self.betas or [self.prior_beta] * self.buckets
        self._prefix = 1.0

    def begin_round(self, rng: random.Random) -> int:
        self._prefix = 1.0
        return self.k_max

    def keep_drafting(self, drafted: int, confidence: float, rng: random.Random) -> bool:
        b = confidence_bucket(confidence, self.buckets)
        theta = rng.betavariate(self.alphas[b], self.betas[b])
        if self.min_accept > 0:
            # Cost-aware: go on while the sampled chance that every draft so far and the next one (judged
            # like this one) are accepted is worth a draft step.
            self._prefix *= theta
            return self._prefix * theta >= self.min_accept
        return rng.random() < theta

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """Only judged drafts count: the accepted ones and the first rejected one."""
        judged = confidences[: accepted + 1]
        for i, confidence in enumerate(judged):
            b = confidence_bucket(confidence, self.buckets)
            self.alphas[b], self.betas[b] = posterior_update(
                self.alphas[b], self.betas[b], 1, 1 if i < accepted else 0, self.discount
            )

    def state(self) -> dict[str, float]:
        return {
            **{f"alpha.{b}": a for b, a in enumerate(self.alphas)},
            **{f"beta.{b}": v for b, v in enumerate(self.betas)},
        }

    def _state_bounds(self, key: str) -> tuple[float, float, bool]:
        return (*POSTERIOR, False)  # alpha.<b> and beta.<b>

    def _load(self, state: dict[str, float]) -> None:
        for key, value in state.items():
            kind, bucket = key.split(".")
            (self.alphas if kind == "alpha" else self.betas)[int(bucket)] = value


POLICIES: dict[str, type[DraftPolicy]] = {
    cls.name: cls for cls in (NoSpeculation, FixedK, Heuristic, ConfidenceThreshold, BetaTS, CalibrationTS)
}


def make_policy(
    params: PolicyParams,
    state: dict[str, float] | None = None,
    measured_cost: float | None = None,
    pooled: tuple[float, float] = (0.0, 0.0),
) -> DraftPolicy:
    """Builds the named policy with its options (dataclass fields) and optional saved state; `measured_cost`
    is the draft cost ratio the node measures now and `pooled` its recent verdicts (VerdictPool.prior), for
    policies that ask for them (`load_aware`)."""
    params.validate()
    cls = POLICIES[params.name]
    knobs = {f.name: f.metadata["bounds"] for f in fields(cls) if "bounds" in f.metadata}
    unknown = set(params.options) - set(knobs)
    if unknown:
        raise InvalidArgument("policy_options", f"{params.name} takes {sorted(knobs)}, not {sorted(unknown)}")
    for name, value in params.options.items():
        check_bounded(f"policy_options.{name}", value, knobs[name])
    policy = cls(k_max=params.k_max, **params.options)
    if measured_cost is not None and math.isfinite(measured_cost) and hasattr(policy, "measured_cost"):
        policy.measured_cost = measured_cost
        policy.pooled = pooled
    if state:
        policy.load_state(state)
    return policy
