"""Metrics, traces and access lines of a real stack (loopback processes): one Generate's metric deltas equal
the per-request speculation stats of its summary, exactly, under vLLM's names where vLLM has the metric, with
model_name; its spans, exported over OTLP by the three services to a receiver here, form one trace under the
client's traceparent; the controller's access line reports it."""

import json
import secrets
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest
from eesd_client import EesdClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from loadtest.scrape import P, Samples, V, k_histogram, scrape, speculation_stats
from serving.local_stack import LocalStack

MODEL_NAME = "llama"  # the model directory's name: the default served_model_name


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it gets, with its service's name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    self.spans.extend((attributes["service.name"], span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def collector():
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory, collector):
    stack = LocalStack(tiny_models["llama"], 1, log_dir=tmp_path_factory.mktemp("metrics-stack"), threads=1)
    try:
        with pytest.MonkeyPatch.context() as env:  # the processes inherit it: every service traces
            env.setenv("EESD_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 0.1 s (default 5 s)
            stack.start()
        yield stack
    finally:
        stack.stop()


def urls(stack: LocalStack, role: str) -> list[str]:
    return [n.metrics_url for n in stack.by_role(role)]


def test_every_service_serves_metrics(stack):
    assert all(n.metrics_port for n in stack.nodes)
    # The controller routes to a node once its health probe saw it SERVING (within node_probe_s).
    wait_for(lambda: scrape(urls(stack, "controller")).total(P + "nodes_ready") == 2, timeout_s=15)
    controller = scrape(urls(stack, "controller"))
    model = (("model_name", MODEL_NAME),)
    assert (V + "num_requests_running", model) in controller.values
    assert controller.values[(V + "num_requests_waiting", model)] == 0
    assert controller.values[(P + "nodes_ready", (("role", "verifier"),))] == 1
    assert controller.values[(P + "nodes_ready", (("role", "drafter"),))] == 1
    for role in ("drafter", "verifier"):
        samples = scrape(urls(stack, role))
        assert samples.total(P + "node_queue_depth", role=role) == 0
        assert (P + "node_sessions", (("role", role),)) in samples.values
        assert (V + "kv_cache_usage_perc", (*model, ("role", role))) in samples.values
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
    assert delta.total(V + "spec_decode_num_draft_tokens_total", model_name=MODEL_NAME) == spec.drafted
    assert delta.total(V + "spec_decode_num_accepted_tokens_total", model_name=MODEL_NAME) == spec.accepted
    assert delta.total(V + "spec_decode_num_drafts_total") == sum(r.drafted > 0 for r in result.rounds)
    assert delta.total(V + "generation_tokens_total") == result.stats.usage.completion_tokens == len(result.token_ids)
    assert delta.total(V + "prompt_tokens_total") == 4
    assert k_histogram(delta) == dict(spec.k_histogram)
    assert delta.total(P + "spec_decode_k_chosen_count") == spec.rounds

    # Per draft position, from the rounds the stream reported.
    drafted_at, accepted_at = Counter(), Counter()
    for r in result.rounds:
        for i in range(r.drafted):
            drafted_at[str(i)] += 1
            accepted_at[str(i)] += i < r.accepted
    assert delta.by_label(P + "spec_decode_num_draft_tokens_per_pos_total", "position") == drafted_at
    assert delta.by_label(V + "spec_decode_num_accepted_tokens_per_pos_total", "position") == +accepted_at

    # Time split: the same measurements, summed.
    time_ms = {p: s * 1e3 for p, s in delta.by_label(P + "round_duration_seconds_sum", "part").items()}
    for part in ("draft", "verify", "transport", "controller"):
        assert time_ms[part] == pytest.approx(getattr(split, f"{part}_ms"), rel=1e-6, abs=1e-6)
    assert delta.total(V + "request_success_total", finished_reason="length", model_name=MODEL_NAME) == 1

    # The request's latency and length histograms, as vLLM defines them: one request of 4 + 24 tokens,
    # streamed in one chunk per round.
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert delta.total(V + histogram + "_count", model_name=MODEL_NAME) == 1
    assert delta.total(V + "request_time_per_output_token_seconds_count") == 1
    assert delta.total(V + "inter_token_latency_seconds_count") == spec.rounds - 1
    assert delta.total(V + "request_prompt_tokens_sum") == 4 and delta.total(V + "request_prompt_tokens_count") == 1
    assert delta.total(V + "request_generation_tokens_sum") == 24
    assert delta.total(V + "request_queue_time_seconds_count") == 1
    ttft, e2e = (delta.total(V + f"{h}_sum") for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"))
    itl = delta.total(V + "inter_token_latency_seconds_sum")
    assert 0 < ttft < e2e and ttft + itl <= e2e + 1e-6
    assert delta.total(V + "request_time_per_output_token_seconds_sum") == pytest.approx(itl / 23, rel=1e-6)

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


def test_a_request_is_one_trace_across_the_services_and_one_access_line(stack, collector):
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    with EesdClient(stack.controller_address, timeout=120) as client:
        result = client.generate_text(
            [21, 22, 23], max_new_tokens=12, stop_on_eos=False, traceparent=f"00-{trace_id}-{caller}-01"
        )
    rounds = len(result.rounds)

    def named(name: str) -> list:
        return [span for _, span in collector.trace(trace_id) if span.name == name]

    def parents(name: str) -> set:
        return {span.parent_span_id for span in named(name)}

    def ids(*names: str) -> set:
        return {span.span_id for name in names for span in named(name)}

    def complete() -> bool:
        """Each process exports its spans when they end, in its own batches: wait for the whole tree."""
        return (
            len(named("eesd.round")) == rounds
            and bool(named("eesd.v1.ControllerService/Generate"))
            and bool(named("eesd.verify"))
            and parents("eesd.v1.DrafterService/Draft") <= ids("eesd.round")
            # a round's verification: under its Draft span (on the VerifyStream), or under a verifier-only
            # round's Verify call
            and parents("eesd.verify") <= ids("eesd.v1.DrafterService/Draft", "eesd.v1.VerifierService/Verify")
        )

    wait_for(complete, timeout_s=20)
    spans = collector.trace(trace_id)
    assert {service for service, _ in spans} == {"eesd-controller", "eesd-drafter", "eesd-verifier"}
    (generate,) = named("eesd.v1.ControllerService/Generate")
    assert generate.parent_span_id.hex() == caller  # the client's span is the request's parent
    assert parents("eesd.round") == {generate.span_id}
    assert named("eesd.v1.DrafterService/Draft") and parents("eesd.v1.DrafterService/Draft") <= ids("eesd.round")
    assert parents("eesd.verify") <= ids("eesd.v1.DrafterService/Draft", "eesd.v1.VerifierService/Verify")
    assert parents("eesd.v1.VerifierService/Verify") <= ids("eesd.round")
    opened = [s for s in named("eesd.v1.VerifierService/OpenSession") if s.parent_span_id == generate.span_id]
    assert len(opened) == 1  # admission, under the request
    attributes = {a.key: a.value for a in generate.attributes}
    assert attributes["eesd.generated_tokens"].int_value == 12 and attributes["eesd.status"].string_value == "OK"

    # The controller's access line for the request, a JSON line naming the same trace; no prompt text.
    wait_for(lambda: result.session_id in stack.by_role("controller")[0].log.read_text(), timeout_s=5)
    lines = [
        json.loads(line) for line in stack.by_role("controller")[0].log.read_text().splitlines() if line.startswith("{")
    ]
    (access,) = [
        line for line in lines if line.get("logger") == "eesd.access" and line.get("session") == result.session_id
    ]
    assert access["method"] == "Generate" and access["status"] == "OK" and access["trace_id"] == trace_id
    assert access["prompt_tokens"] == 3 and access["generated_tokens"] == 12 and access["rounds"] == rounds
    assert access["streamed_tokens"] == 12 and access["finish_reason"] == "length" and access["ttft_ms"] > 0
    assert access["tau"] == pytest.approx(result.stats.speculation.mean_accepted_tokens, abs=1e-3)
    assert "prompt" not in access and "text" not in access
