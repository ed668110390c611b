"""Prometheus metrics of a real stack (loopback processes): one Generate's metric deltas equal the per-request
speculation stats of its summary, exactly."""

import time
from collections import Counter

import pytest
from eesd_client import EesdClient

from loadtest.scrape import P, Samples, k_histogram, scrape, speculation_stats
from serving.local_stack import LocalStack


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    stack = LocalStack(tiny_models["llama"], 1, log_dir=tmp_path_factory.mktemp("metrics-stack"), threads=1)
    try:
        yield stack.start()
    finally:
        stack.stop()


def urls(stack: LocalStack, role: str) -> list[str]:
    return [n.metrics_url for n in stack.by_role(role)]


def test_every_service_serves_metrics(stack):
    assert all(n.metrics_port for n in stack.nodes)
    controller = scrape(urls(stack, "controller"))
    assert (P + "num_requests_running", ()) in controller.values
    assert controller.values[(P + "num_requests_waiting", ())] == 0
    for role in ("drafter", "verifier"):
        samples = scrape(urls(stack, role))
        assert samples.total(P + "node_queue_depth", role=role) == 0
        assert (P + "node_sessions", (("role", role),)) in samples.values
        assert (P + "kv_cache_usage_perc", (("role", role),)) in samples.values
        assert samples.total(P + "node_requests_waiting", role=role) == 0
        assert (P + "node_batch_size_count", (("role", role),)) in samples.values
        assert (P + "rounds_total", ()) not in samples.values  # controller metrics live in the controller only


def wait_for(condition, timeout_s: float = 5.0) -> None:
    """The interceptor counts a stream's status as the handler returns, just around the client's last message."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_metrics_of_one_generation_equal_its_stats(stack):
    every = [n.metrics_url for n in stack.nodes if n.metrics_port]
    before = scrape(every)
    with EesdClient(stack.controller_address, timeout=120) as client:
        result = client.generate_text([11, 12, 13, 14], max_new_tokens=24, stop_on_eos=False, policy="beta-ts")
    ok = {"grpc_method": "Generate", "grpc_code": "OK"}
    wait_for(lambda: (scrape(every) - before).total(P + "grpc_server_handled_total", **ok) >= 1)
    delta = scrape(every) - before
    spec, split = result.stats.speculation, result.stats.time_split
    assert spec.rounds > 1 and spec.drafted > 0

    assert delta.total(P + "rounds_total") == spec.rounds == len(result.rounds)
    assert delta.total(P + "spec_decode_num_draft_tokens_total") == spec.drafted
    assert delta.total(P + "spec_decode_num_accepted_tokens_total") == spec.accepted
    assert delta.total(P + "spec_decode_num_drafts_total") == sum(r.drafted > 0 for r in result.rounds)
    assert delta.total(P + "generation_tokens_total") == result.stats.usage.completion_tokens == len(result.token_ids)
    assert delta.total(P + "prompt_tokens_total") == 4
    assert k_histogram(delta) == dict(spec.k_histogram)
    assert delta.total(P + "spec_decode_k_chosen_count") == spec.rounds

    # Per draft position, from the rounds the stream reported.
    drafted_at, accepted_at = Counter(), Counter()
    for r in result.rounds:
        for i in range(r.drafted):
            drafted_at[str(i)] += 1
            accepted_at[str(i)] += i < r.accepted
    assert delta.by_label(P + "spec_decode_num_draft_tokens_per_pos_total", "position") == drafted_at
    assert delta.by_label(P + "spec_decode_num_accepted_tokens_per_pos_total", "position") == +accepted_at

    # Time split: the same measurements, summed.
    time_ms = {p: s * 1e3 for p, s in delta.by_label(P + "round_duration_seconds_sum", "part").items()}
    for part in ("draft", "verify", "transport", "controller"):
        assert time_ms[part] == pytest.approx(getattr(split, f"{part}_ms"), rel=1e-6, abs=1e-6)
    assert delta.total(P + "request_success_total", finished_reason="length") == 1
    assert delta.total(P + "e2e_request_latency_seconds_count") == 1

    # Nodes: every round ran one verify pass; rejected drafts were rolled back on the verifier.
    assert delta.total(P + "node_forward_seconds_count", role="verifier", op="verify") == spec.rounds
    # A round drafts afresh or takes the block its drafter drafted ahead; k=0 may skip the drafter.
    proposals = delta.total(P + "node_forward_seconds_count", role="drafter", op="propose")
    used = delta.total(P + "drafter_lookaheads_total", outcome="used")
    assert spec.rounds - spec.k_histogram.get(0, 0) <= proposals + used <= spec.rounds
    assert delta.total(P + "node_forward_seconds_count", role="drafter", op="propose_ahead") >= used
    assert delta.total(P + "kv_rollback_tokens_total", role="verifier") >= spec.drafted - spec.accepted
    assert delta.total(P + "prefills_total") >= 1  # the prompt
    assert delta.total(P + "state_store_request_duration_seconds_count", op="commit_round") == spec.rounds
    assert delta.total(P + "grpc_server_handled_total", **ok) == 1

    stats = speculation_stats(delta)
    assert stats["acceptance_rate"] == pytest.approx(spec.accepted / spec.drafted)
    assert stats["mean_accepted_tokens"] == pytest.approx(spec.mean_accepted_tokens)


def test_errors_are_counted_by_status_code(stack):
    from eesd_client import InvalidArgumentError

    before = scrape(urls(stack, "controller"))
    with EesdClient(stack.controller_address, timeout=60) as client, pytest.raises(InvalidArgumentError):
        client.generate_text([11, 12], max_new_tokens=10**6)
    bad = {"grpc_method": "Generate", "grpc_code": "INVALID_ARGUMENT"}
    wait_for(lambda: (scrape(urls(stack, "controller")) - before).total(P + "grpc_server_handled_total", **bad) >= 1)
    delta: Samples = scrape(urls(stack, "controller")) - before
    assert delta.total(P + "grpc_server_handled_total", **bad) == 1
