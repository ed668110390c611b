"""Draft policies: posterior updates follow the formulas; state round-trips through a flat dict."""

import random

import pytest

from eesd.errors import InvalidArgument
from eesd.params import PolicyParams
from eesd.policies import BetaTS, CalibrationTS, Heuristic, best_block, make_policy, posterior_update


@pytest.mark.parametrize(
    ("judged", "accepted", "expected"), [(5, 5, (6.0, 1.0)), (5, 2, (3.0, 2.0)), (3, 0, (1.0, 2.0))]
)
def test_beta_ts_update_is_the_exact_likelihood(judged, accepted, expected):
    policy = BetaTS(k_max=8)
    policy.update([0.9] * judged, accepted)
    assert (policy.alpha, policy.beta) == expected


def test_discount_forgets_geometrically():
    assert posterior_update(10.0, 4.0, 3, 1, discount=0.5) == (6.0, 3.0)


def test_calibration_ts_updates_only_judged_tokens():
    policy = CalibrationTS(k_max=8, buckets=4)
    # drafts 0 and 1 accepted, draft 2 rejected, draft 3 never judged
    policy.update([0.9, 0.1, 0.6, 0.3], accepted=2)
    assert policy.alphas == [2.0, 1.0, 1.0, 2.0]  # buckets of 0.1 and 0.9 gained one acceptance
    assert policy.betas == [1.0, 1.0, 2.0, 1.0]  # bucket of 0.6 gained one rejection, 0.3 untouched
    policy.update([0.3, 0.3], accepted=2)  # all accepted: no rejection is counted
    assert policy.alphas[1] == 3.0 and sum(policy.betas) == 5.0


@pytest.mark.parametrize("name", ["beta-ts", "calibration-ts", "heuristic", "fixed", "threshold", "off"])
def test_state_round_trips_through_flat_dict(name):
    policy = make_policy(PolicyParams(name, k_max=6))
    for accepted in (3, 0, 2):
        policy.update([0.8, 0.5, 0.2, 0.95], accepted)
    state = policy.state()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in state.items())
    restored = make_policy(PolicyParams(name, k_max=6), state)
    assert restored.state() == state
    rng_a, rng_b = random.Random(1), random.Random(1)
    assert [policy.begin_round(rng_a) for _ in range(5)] == [restored.begin_round(rng_b) for _ in range(5)]


def test_heuristic_schedule():
    policy = Heuristic(k_max=6, k_current=4)
    policy.update([1.0] * 4, 4)
    assert policy.k_current == 6
    policy.update([1.0] * 6, 6)
    assert policy.k_current == 6  # capped at k_max
    for _ in range(10):
        policy.update([1.0] * 6, 0)
    assert policy.k_current == 1


def test_beta_ts_drafts_less_after_rejections():
    rng = random.Random(0)
    confident, doubtful = BetaTS(k_max=8, alpha=50, beta=1), BetaTS(k_max=8, alpha=1, beta=50)

    def mean_length(policy):
        total = 0
        for _ in range(300):
            policy.begin_round(rng)
            drafted = 1
            while drafted < 8 and policy.keep_drafting(drafted, 0.5, rng):
                drafted += 1
            total += drafted
        return total / 300

    assert mean_length(confident) > 6 > 2 > mean_length(doubtful)


def test_off_and_caps():
    assert make_policy(PolicyParams("off")).begin_round(random.Random(0)) == 0
    assert make_policy(PolicyParams("fixed", k_max=3, options={"k": 7})).begin_round(random.Random(0)) == 3


def test_bad_policy_input_names_the_field():
    with pytest.raises(InvalidArgument, match="policy"):
        make_policy(PolicyParams("greedy-guess"))
    with pytest.raises(InvalidArgument, match="policy_options"):
        make_policy(PolicyParams("fixed", options={"kk": 2}))
    with pytest.raises(InvalidArgument, match="policy_state"):
        make_policy(PolicyParams("beta-ts"), {"gamma": 1.0})
    with pytest.raises(InvalidArgument, match="k_max"):
        make_policy(PolicyParams("beta-ts", k_max=-1))


def test_cost_aware_beta_ts_picks_the_block_that_maximises_throughput():
    from eesd.policies import expected_committed

    assert expected_committed(0.5, 2) == pytest.approx(1.75) and expected_committed(1.0, 3) == 4.0
    assert best_block([0.95], 0.1, 8) == 8 and best_block([0.2], 0.5, 8) == 1
    assert 1 < best_block([0.8], 0.25, 8) < 8
    confident = make_policy(PolicyParams("beta-ts", k_max=8, options={"alpha": 90, "beta": 10, "draft_cost": 0.25}))
    rng = random.Random(0)
    ks = [confident.begin_round(rng) for _ in range(50)]
    assert all(confident.keep_drafting(1, 0.1, rng) for _ in range(5))  # the block was chosen up front
    assert 3 <= sum(ks) / len(ks) <= 8


def test_cost_aware_calibration_ts_stops_when_the_prefix_is_unlikely():
    rng = random.Random(0)
    policy = make_policy(PolicyParams("calibration-ts", options={"buckets": 2, "min_accept": 0.5}))
    policy.alphas, policy.betas = [1.0, 200.0], [200.0, 1.0]  # low confidence: rejected, high: accepted
    policy.begin_round(rng)
    assert all(policy.keep_drafting(i, 0.9, rng) for i in range(1, 6))
    assert not policy.keep_drafting(6, 0.1, rng)


def test_load_aware_beta_ts_backs_off_as_the_draft_cost_grows():
    """k > 0 pays only while theta > rho; at rho >= 1 (a full verifier) no block beats k = 0."""

    assert best_block([0.6], 0.7, 8, smallest=0) == 0 and best_block([0.8], 0.7, 8, smallest=0) >= 1
    assert all(best_block([0.99], rho, 8, smallest=0) == 0 for rho in (1.0, 1.5, 4.0))
    options = {"alpha": 80.0, "beta": 20.0, "load_aware": 1.0}
    mean_k = {}
    for rho in (0.05, 0.3, 0.6, 1.2):
        policy = make_policy(PolicyParams("beta-ts", k_max=8, options=options), measured_cost=rho)
        rng = random.Random(1)
        mean_k[rho] = sum(policy.begin_round(rng) for _ in range(200)) / 200
    assert mean_k[0.05] > mean_k[0.3] > mean_k[0.6] > mean_k[1.2] == 0
    unmeasured = make_policy(PolicyParams("beta-ts", k_max=8, options=options))
    assert unmeasured.begin_round(random.Random(1)) == 8  # no measurement yet: the configured rule
    for measured in ("measured_cost", "pooled"):  # a request cannot claim a cost or a pool
        with pytest.raises(InvalidArgument, match="policy_options"):
            make_policy(PolicyParams("beta-ts", options={measured: 0.0}))


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("beta-ts", {"alpha": float("nan")}, "policy_options.alpha"),
        ("beta-ts", {"beta": float("inf")}, "policy_options.beta"),
        ("beta-ts", {"alpha": 1e308}, "policy_options.alpha"),
        ("beta-ts", {"discount": 0.0}, "policy_options.discount"),
        ("calibration-ts", {"prior_alpha": -1.0}, "policy_options.prior_alpha"),
        ("calibration-ts", {"buckets": 1e6}, "policy_options.buckets"),
        ("calibration-ts", {"buckets": 2.5}, "policy_options.buckets"),
        ("fixed", {"k": 1e9}, "policy_options.k"),
        ("threshold", {"threshold": float("nan")}, "policy_options.threshold"),
    ],
)
def test_hostile_options_are_refused_naming_the_knob(name, options, field):
    """Nothing that could send the policy's math astray (a NaN Beta parameter loops betavariate forever,
    a huge bucket count eats memory) gets past make_policy."""
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        make_policy(PolicyParams(name, options=options))


@pytest.mark.parametrize(
    ("name", "state", "field"),
    [
        ("beta-ts", {"alpha": float("nan"), "beta": 1.0}, "policy_state.alpha"),
        ("calibration-ts", {"beta.3": float("-inf")}, "policy_state.beta.3"),
        ("heuristic", {"k_current": 1e12}, "policy_state.k_current"),
    ],
)
def test_hostile_state_is_refused_naming_the_key(name, state, field):
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        make_policy(PolicyParams(name), state)


def test_a_discounted_posterior_stays_legal():
    policy = BetaTS(k_max=8, discount=0.01)
    for _ in range(200):
        policy.update([0.5] * 4, 0)  # alpha decays towards 0, never below the legal floor
    make_policy(PolicyParams("beta-ts", options={"discount": 0.01}), policy.state())


def test_a_lock_step_batch_drafts_one_block_that_maximises_its_expected_tokens():
    """sum_i tau(theta_i, k) / (1 + rho k): a batch of one is the single-session rule, and a batch's k lies
    between what its least and most confident sessions would draft alone."""
    from eesd.policies import expected_committed

    for theta, rho in ((0.9, 0.1), (0.6, 0.2), (0.3, 0.5)):
        assert best_block([theta] * 5, rho, 8, smallest=0) == best_block([theta], rho, 8, smallest=0)
    thetas, rho = [0.6, 0.9], 0.2
    k = best_block(thetas, rho, 8, smallest=0)
    assert best_block([0.6], rho, 8, smallest=0) < k < best_block([0.9], rho, 8, smallest=0)
    value = [sum(expected_committed(t, j) for t in thetas) / (1 + rho * j) for j in range(9)]
    assert value[k] == max(value)


def test_only_a_load_sized_policy_offers_its_draw_to_a_lock_step_batch():
    aware = PolicyParams("beta-ts", 8, {"load_aware": 1.0, "alpha": 3.0, "beta": 2.0})
    theta = make_policy(aware, measured_cost=0.2).load_sized_theta(random.Random(7))
    assert theta == random.Random(7).betavariate(3.0, 2.0)  # the draw begin_round would make
    pooled = make_policy(aware, measured_cost=0.2, pooled=(6.0, 1.5)).load_sized_theta(random.Random(7))
    assert pooled == random.Random(7).betavariate(9.0, 3.5)  # the pool's pseudo-counts join the draw
    # A session sizing its own block (through the services) draws the same.
    alone = make_policy(aware, measured_cost=0.2, pooled=(6.0, 1.5)).begin_round(random.Random(7))
    assert alone == best_block([pooled], 0.2, 8, smallest=0)
    assert make_policy(aware).load_sized_theta(random.Random(7)) is None  # nothing measured yet
    assert make_policy(PolicyParams("beta-ts", 8), measured_cost=0.2).load_sized_theta(random.Random(7)) is None
    assert make_policy(PolicyParams("fixed", 4), measured_cost=0.2).load_sized_theta(random.Random(7)) is None


def test_the_verdict_pool_is_the_recent_verdicts_acceptance_rate_as_pseudo_counts():
    """Counted as posterior_update counts a verdict (accepted drafts, one rejection if any draft failed), with
    a flat prior, over the last `window` verdicts; a round that drafted nothing says nothing."""
    from eesd.policies import VerdictPool

    pool = VerdictPool(window=3)
    assert pool.prior(64.0) == (0.0, 0.0)  # nothing pooled yet: the draws are the sessions' own
    pool.add(0, 0)
    assert pool.prior(64.0) == (0.0, 0.0)
    pool.add(4, 4)  # all kept: 4 accepted, no rejection
    pool.add(4, 1)  # 1 accepted, then a rejection
    rate = (1 + 5) / (2 + 5 + 1)
    assert pool.prior(8.0) == pytest.approx((8.0 * rate, 8.0 * (1 - rate)))
    for _ in range(3):  # the window keeps the latest only
        pool.add(5, 0)
    assert pool.prior(4.0) == pytest.approx((4.0 * 1 / 5, 4.0 * 4 / 5))
