"""Fault trials (loadtest/faults.py, issue #13) on a whole stack: two controllers sharing Redis (AOF on, behind
a TCP proxy that can cut it), two drafters, two verifiers; greedy sessions through the SDK pointed at both
controllers. Every fault (kill -9 and SIGSTOP of a controller, a drafter, a verifier; Redis killed and started
again empty or from its AOF, paused, unreachable) hits running sessions, and every session still streams
exactly the model's greedy output: no client-visible error, no duplicated or missing token, and the store
ends with exactly the tokens the client got.

Fast: one trial of each fault on short sessions, with a controller that finds a hung node lost after 2 s.
Slow: more trials at the controller's default node_lost_s (5 s), nodes hung 10 s, Redis down 6 s.
"""

import pytest

from loadtest.faults import FAULTS, FaultBench, fault_stack, run_faults
from tests.e2e.helpers import oracle

PROMPTS = [[31, 32, 33, 34], [5, 6, 7, 8, 9, 10], [300, 200, 100], [11, 12, 13, 14, 15]]


def assert_clean(report: dict, log_dir) -> None:
    """Every fault's sessions: identical to the reference, no error, no duplicate or gap, the store agrees."""
    assert report["baseline"]["identical"] == report["baseline"]["sessions"], report["baseline"]["failures"]
    for name, s in report["faults"].items():
        where = f"{name}: {s['failures']} (logs in {log_dir})"
        assert s["identical"] == s["sessions"], where
        assert s["client_errors"] == 0, where
        assert s["duplicated_tokens"] + s["extra_tokens"] + s["missing_tokens"] + s["wrong_tokens"] == 0, where
        assert s["store_mismatches"] == 0, where
        assert s["process_deaths"] == 0, where
        # The fault hit sessions that were still streaming, and a killed controller's clients resumed.
        assert s["sessions_hit"] > 0, f"{name}: no trial's fault hit a running session: {s['trial_list']}"
        if name == "controller-kill":
            assert s["resumes"] >= s["trials"], where
    assert all(t["pass"] for t in report["targets"]), report["targets"]


def bench(stack, proxy, model_dir, **kwargs) -> FaultBench:
    return FaultBench(stack, proxy, PROMPTS, lambda prompt, n: oracle(model_dir, prompt, n), **kwargs)


@pytest.fixture(scope="module")
def fast_stack(tiny_models, tmp_path_factory, require_redis):
    """The fault stack; its controllers probe nodes every 0.5 s and find a hung one lost after 2 s."""
    log_dir = tmp_path_factory.mktemp("faults-fast-logs")
    args = ("--node-probe-s", "0.5", "--node-lost-s", "2")
    with fault_stack(tiny_models["llama"], 1, log_dir=log_dir, controller_args=args) as (stack, proxy):
        yield stack, proxy


@pytest.mark.slow  # ~85 s: ten faults one after another on a stack of its own
def test_every_fault_once_under_running_sessions(fast_stack, tiny_models):
    stack, proxy = fast_stack
    model = tiny_models["llama"]
    trials = bench(stack, proxy, model, sessions=2, max_new_tokens=120, hang_s=3.0, redis_down_s=2.0, timeout_s=120)
    report = run_faults(trials, {name: 1 for name in FAULTS}, baseline_trials=1)
    assert_clean(report, stack.log_dir)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 8 minutes on 2 quiet cores, over 10 on loaded ones (pyproject's default)
def test_fault_trials_at_scale(tiny_models, tmp_path_factory, require_redis):
    """15 kills of each process role, 2 hangs of 10 s of each, 3 trials of each Redis fault (6 s outages);
    the controllers' defaults (node_lost_s 5 s, store_wait_s 30 s). About 8 minutes on 2 cores."""
    log_dir = tmp_path_factory.mktemp("faults-slow-logs")
    plan = {
        "controller-kill": 15,
        "drafter-kill": 15,
        "verifier-kill": 15,
        "controller-hang": 2,
        "drafter-hang": 2,
        "verifier-hang": 2,
        "redis-kill-empty": 3,
        "redis-kill-aof": 3,
        "redis-pause": 3,
        "redis-unreachable": 3,
    }
    with fault_stack(tiny_models["llama"], 1, log_dir=log_dir) as (stack, proxy):
        model = tiny_models["llama"]
        trials = bench(stack, proxy, model, sessions=4, max_new_tokens=160, hang_s=10.0, redis_down_s=6.0)
        report = run_faults(trials, plan, baseline_trials=2)
    assert_clean(report, log_dir)
    for name, count in plan.items():
        assert report["faults"][name]["trials"] == count
    # The controllers' logs show the paths the faults took: resumes, moves off a hung node, write-backs.
    events = {name: s["controller_log_events"] for name, s in report["faults"].items()}
    assert events["controller-kill"]["resumed"] >= plan["controller-kill"], events
    assert events["drafter-hang"]["node_lost"] >= 1 and events["verifier-hang"]["node_lost"] >= 1, events
    assert events["redis-kill-empty"]["written_back"] >= 1, events
