"""eesd.load: pass costs fitted from what a node measures, and the marginal cost of a draft token."""

import pytest

from eesd.load import NodeLoad, PassCost, PassTimer, draft_cost_ratio, fit_pass_cost


def parts(cost: PassCost) -> tuple[float, float, float]:
    return cost.fixed_s, cost.per_token_s, cost.per_row_s


def approx(fixed_s: float, per_token_s: float, per_row_s: float):
    return pytest.approx((fixed_s, per_token_s, per_row_s), abs=1e-12)


def test_fit_recovers_a_linear_pass_cost():
    samples = [(t, 1, 0.010 + 0.002 * t) for t in (1, 6, 12, 40, 96)]
    cost = fit_pass_cost(samples)
    assert parts(cost) == approx(0.010, 0.002, 0.0)
    assert fit_pass_cost([(6, 1, 0.01), (6, 2, 0.02)]) is None  # one token count fixes no slope
    assert fit_pass_cost([(1, 1, 0.02), (50, 1, 0.01)]).per_token_s == 0.0  # noise never makes tokens free money


def test_fit_tells_a_rows_cost_from_a_tokens_cost():
    """Passes of 1 to 16 sessions with 1 to 6 tokens each: a draft adds a token, not a row, so its price is
    per_token alone, where a line through tokens would charge it part of the rows' cost as well."""
    samples = [(rows * k, rows, 0.030 + 0.002 * rows + 0.001 * rows * k) for rows in (1, 4, 16) for k in (1, 3, 6)]
    assert parts(fit_pass_cost(samples)) == approx(0.030, 0.001, 0.002)
    line = fit_pass_cost([(tokens, 1, seconds) for tokens, _, seconds in samples])  # rows left out
    assert line.per_token_s > 1.3 * 0.001  # a third too dear
    # Rows that never vary apart from tokens (every pass one token a row, or the same rows): the line.
    one_token_rows = [(rows, rows, 0.004 + 0.0007 * rows) for rows in (1, 2, 8, 16)]
    assert parts(fit_pass_cost(one_token_rows)) == approx(0.004, 0.0007, 0.0)
    same_rows = [(16 * k, 16, 0.050 + 0.001 * 16 * k) for k in (1, 3, 5)]
    assert parts(fit_pass_cost(same_rows)) == approx(0.050, 0.001, 0.0)
    # A rows' part that noise makes negative is no part: tokens keep the whole slope.
    assert fit_pass_cost([(2, 2, 0.01), (4, 1, 0.012), (8, 4, 0.014)]).per_row_s == 0.0


def test_timer_reports_cost_and_rows_of_recent_passes():
    timer = PassTimer(window=4)
    assert timer.load() is None
    for tokens, rows in ((1, 1), (100, 1), (6, 2), (12, 2), (24, 4), (48, 8)):  # the first two fall out
        timer.record(tokens, rows, 0.005 + 0.001 * tokens)
    load = timer.load()
    assert load.rows_per_pass == pytest.approx(4.0)
    assert parts(load.cost) == approx(0.005, 0.001, 0.0)


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


def test_a_rows_cost_is_paid_once_per_round_and_again_per_draft_step():
    """Per session, a round pays its verify row and a draft pays a drafter row: per_row counts where a row
    is added, never per verified token."""
    verifier = NodeLoad(PassCost(0.016, 0.001, 0.002), 16.0)
    drafter = NodeLoad(PassCost(0.004, 0.0001, 0.0006), 16.0)
    expected = (0.001 + 0.004 / 16 + 0.0006 + 0.0001) / (0.016 / 16 + 0.002 + 0.001)
    assert draft_cost_ratio(verifier, drafter) == pytest.approx(expected)
