"""Logs, vLLM-named metrics and trace propagation, in one process (serving/logs.py, serving/metrics.py,
serving/tracing.py); tests/integration/test_metrics.py checks them on a real stack."""

import asyncio
import io
import json
import logging
import time

import grpc
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from controller.round_loop import Finished, RoundEvent
from eesd.generation import GenerationStats
from eesd.rounds import RoundStats
from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from serving import logs, tracing
from serving.errors import DomainErrorInterceptor
from serving.metrics import ControllerMetrics, RequestTimes

MODEL = "tiny-llama"


def log_line(formatter: logging.Formatter, message: str, **extra) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-{id(formatter)}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        logger.info(message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_the_extra_fields_and_never_split():
    text = log_line(logs.JsonFormatter("controller"), "session %s\nforged line", session="a\nb", tokens=3)
    assert text.count("\n") == 1  # the record's own line end only
    line = json.loads(text)
    assert line["service"] == "controller" and line["level"] == "INFO"
    assert line["msg"] == "session %s\nforged line" and line["session"] == "a\nb" and line["tokens"] == 3
    assert line["ts"].endswith("Z")


def test_text_lines_are_one_line_with_key_values():
    text = log_line(logs.TextFormatter("drafter"), "hello\nforged", status="OK", note="two words")
    assert text.count("\n") == 1
    assert " drafter " in text and "hello\\nforged" in text and "status=OK" in text and 'note="two words"' in text


def test_json_lines_name_the_current_trace(spans):
    with tracing.span("work") as current:
        line = json.loads(log_line(logs.JsonFormatter("verifier"), "inside"))
    context = current.get_span_context()
    assert line["trace_id"] == f"{context.trace_id:032x}" and line["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in json.loads(log_line(logs.JsonFormatter("verifier"), "outside"))


def _round(index: int, drafted: int, accepted: int) -> RoundEvent:
    stats = RoundStats(index, drafted, drafted, accepted, accepted + 1, 0.001, 0.002)
    return RoundEvent("s1", index, list(range(accepted + 1)), stats, 0.5, 0.25)


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"model_name": MODEL, **labels}) or 0.0


def test_a_request_gives_the_vllm_families_their_values():
    """TTFT once, ITL per chunk after the first, request TPOT, e2e, token histograms and the spec-decode
    counters, with model_name; a resumed stream's catch-up chunk is no round."""
    registry = CollectorRegistry()
    m = ControllerMetrics(registry, model=MODEL)
    times = RequestTimes()
    rounds = [_round(0, 4, 2), _round(1, 4, 4), _round(2, 0, 0)]  # 3 + 5 + 1 tokens
    for event in rounds:
        time.sleep(0.002)
        m.record(event, times)
    stats = GenerationStats()
    for event in rounds:
        stats.add(event.stats)
    m.record(Finished("s1", "eos", 7, stats, 1.5, 0.75), times)

    assert _value(registry, "vllm:time_to_first_token_seconds_count") == 1
    assert _value(registry, "vllm:inter_token_latency_seconds_count") == 2
    assert _value(registry, "vllm:request_time_per_output_token_seconds_count") == 1
    assert _value(registry, "vllm:request_time_per_output_token_seconds_sum") == pytest.approx(times.tpot_s())
    assert times.tpot_s() == pytest.approx((times.last_token - times.first_token) / 8)
    assert _value(registry, "vllm:e2e_request_latency_seconds_count") == 1
    assert _value(registry, "vllm:e2e_request_latency_seconds_sum") >= _value(
        registry, "vllm:time_to_first_token_seconds_sum"
    )
    assert _value(registry, "vllm:request_prompt_tokens_sum") == 7
    assert _value(registry, "vllm:request_generation_tokens_sum") == 9
    assert _value(registry, "vllm:prompt_tokens_total") == 7
    assert _value(registry, "vllm:generation_tokens_total") == 9
    assert _value(registry, "vllm:request_success_total", finished_reason="stop") == 1
    assert _value(registry, "vllm:spec_decode_num_drafts_total") == 2
    assert _value(registry, "vllm:spec_decode_num_draft_tokens_total") == 8
    assert _value(registry, "vllm:spec_decode_num_accepted_tokens_total") == 6
    assert _value(registry, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") == 2
    assert _value(registry, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="3") == 1
    assert registry.get_sample_value("eesd:rounds_total") == 3

    resumed = RequestTimes()
    m.record(RoundEvent("s1", 2, [5, 6], RoundStats(2, 0, 0, 0, 2, 0.0, 0.0), 0.0, 0.0, replay=True), resumed)
    m.record(_round(3, 2, 1), resumed)
    assert registry.get_sample_value("eesd:rounds_total") == 4  # the catch-up is not a round
    assert _value(registry, "vllm:time_to_first_token_seconds_count") == 1  # nor a first token
    assert resumed.resumed and resumed.caught_up == 2 and resumed.tokens == 2
    fields = resumed.access_fields()
    assert fields["resumed"] and fields["caught_up_tokens"] == 2 and "ttft_ms" not in fields


def test_queue_time_and_gauges():
    registry = CollectorRegistry()
    m = ControllerMetrics(registry, model=MODEL)
    running = {"a", "b"}
    m.watch_running(lambda: len(running))
    with m.queued():
        assert _value(registry, "vllm:num_requests_waiting") == 1
    assert _value(registry, "vllm:num_requests_waiting") == 0
    assert _value(registry, "vllm:request_queue_time_seconds_count") == 1
    assert _value(registry, "vllm:num_requests_running") == 2


class Echo(controller_pb2_grpc.ControllerServiceServicer):
    """GetSession answers from inside a span of its own; Generate fails after one chunk."""

    async def GetSession(self, request, context):
        with tracing.span("inner"):
            logs.access_fields()["note"] = "seen"
            return controller_pb2.GetSessionResponse(session=controller_pb2.Session(session_id=request.session_id))

    async def Generate(self, request, context):
        yield controller_pb2.GenerateResponse(session_id="g1")
        raise grpc.RpcError("boom")


def test_rpc_spans_join_the_callers_trace_and_calls_write_access_lines(spans, caplog):
    """The client's channel interceptor puts the current span's traceparent into the call's metadata; the
    server's interceptor makes its SERVER span a child of it; the controller's API gets access lines."""

    async def main():
        server = aio.server(interceptors=[DomainErrorInterceptor()])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                with tracing.span("client"):
                    await stub.GetSession(controller_pb2.GetSessionRequest(session_id="s\n1"), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in stub.Generate(controller_pb2.GenerateRequest(), timeout=10):
                        pass
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        asyncio.run(main())
    by_name = {s.name: s for s in spans.get_finished_spans()}
    client, server, inner = by_name["client"], by_name["eesd.v1.ControllerService/GetSession"], by_name["inner"]
    assert server.context.trace_id == client.context.trace_id == inner.context.trace_id
    assert server.parent.span_id == client.context.span_id and inner.parent.span_id == server.context.span_id
    assert server.attributes["rpc.grpc.status_code"] == "OK" and server.attributes["eesd.note"] == "seen"
    generate = by_name["eesd.v1.ControllerService/Generate"]
    assert generate.parent is None and generate.attributes["rpc.grpc.status_code"] == "INTERNAL"

    lines = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert [(r.method, r.status) for r in lines] == [("GetSession", "OK"), ("Generate", "INTERNAL")]
    assert lines[0].session == "s\n1" and lines[0].note == "seen" and lines[0].duration_ms >= 0


def test_a_traceparent_names_the_parent_and_a_bad_one_starts_a_trace(spans):
    with tracing.span("drafter") as parent:
        header = tracing.traceparent()
    assert header.startswith("00-") and len(header) == 55
    with tracing.span("verify", traceparent=header) as child:
        pass
    with tracing.span("orphan", traceparent="00-not-a-trace") as orphan:
        pass
    assert child.parent.span_id == parent.get_span_context().span_id
    assert orphan.parent is None


def test_off_costs_nothing():
    assert not tracing.enabled()
    assert tracing.client_interceptors() == [] and tracing.traceparent() == "" and tracing.current_ids() is None
    with tracing.span("nothing") as current:
        assert current is None
    tracing.annotate(current, anything=1)  # no-op
