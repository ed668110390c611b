"""eesd.load: pass costs fitted from what a node measures, and the marginal cost of a draft token."""

import pytest

from eesd.load import NodeLoad, PassCost, PassTimer, draft_cost_ratio, fit_pass_cost


def test_fit_recovers_a_linear_pass_cost():
    samples = [(t, 0.010 + 0.002 * t) for t in (1, 6, 12, 40, 96)]
    cost = fit_pass_cost(samples)
    assert cost.fixed_s == pytest.approx(0.010) and cost.per_token_s == pytest.approx(0.002)
    assert fit_pass_cost([(6, 0.01), (6, 0.02)]) is None  # one token count fixes no slope
    assert fit_pass_cost([(1, 0.02), (50, 0.01)]).per_token_s == 0.0  # noise never makes tokens free money


def test_timer_reports_cost_and_rows_of_recent_passes():
    timer = PassTimer(window=4)
    assert timer.load() is None
    for tokens, rows in ((1, 1), (100, 1), (6, 2), (12, 2), (24, 4), (48, 8)):  # the first two fall out
        timer.record(tokens, rows, 0.005 + 0.001 * tokens)
    load = timer.load()
    assert load.rows_per_pass == pytest.approx(4.0)
    assert load.cost.per_token_s == pytest.approx(0.001) and load.cost.fixed_s == pytest.approx(0.005)


def test_draft_cost_ratio_grows_with_the_batch():
    """An idle verifier (fixed cost paid by one session) makes drafts cheap; a full one makes each draft
    token cost about as much as a whole round."""
    verifier_cost, drafter = PassCost(0.020, 0.0005), NodeLoad(PassCost(0.004, 0.0002), 1.0)
    ratios = [draft_cost_ratio(NodeLoad(verifier_cost, rows), drafter) for rows in (1, 4, 16, 64)]
    assert ratios == sorted(ratios)
    assert ratios[0] == pytest.approx((0.0005 + 0.004 + 0.0002) / (0.020 + 0.0005))
    assert ratios[-1] > 1.0


def test_a_rounds_overhead_outside_the_passes_makes_drafts_relatively_cheaper():
    """Work a round costs whatever its k (the caller's bookkeeping, RPC hops) is paid once per round: the
    more of it, the more each round should commit."""
    verifier, drafter = NodeLoad(PassCost(0.012, 0.0002), 16.0), NodeLoad(PassCost(0.0015, 0.0002), 8.0)
    bare, with_overhead = draft_cost_ratio(verifier, drafter), draft_cost_ratio(verifier, drafter, 0.002)
    assert with_overhead == pytest.approx(bare * (0.012 / 16 + 0.0002) / (0.012 / 16 + 0.0002 + 0.002))
