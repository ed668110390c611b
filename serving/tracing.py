"""OpenTelemetry tracing of requests and rounds across the controller, drafters and verifiers.

Off unless `setup_tracing` gets an OTLP endpoint (config `otlp_endpoint`): then every call below is a no-op
that neither imports OpenTelemetry's SDK nor creates a span, and no gRPC interceptor is installed.

On, the spans of one request share its trace id (docs/observability.md, "Traces"):

- every RPC of an `eesd.v1` service gets a SERVER span (`serving.errors.DomainErrorInterceptor` opens it),
  the child of the W3C `traceparent` / `tracestate` the call carries in its gRPC metadata (the client SDK
  sends the caller's; the controller sends its own to the nodes through `client_interceptors`); so does every
  request to the controller's HTTP API, the child of its `traceparent` header (`server_span`, one rule for
  both through serving.observability.observed);
- the controller opens one span per round (`eesd.round`, under the request's `Generate` span) and one per
  state-store call; the drafter's Draft span is the parent of the verifier's span for the round
  (`eesd.verify`), whose context travels in the VerifyRequest's `traceparent` field because the drafter's
  VerifyStream multiplexes the rounds of all its sessions on one call.

Spans go out in batches over OTLP/gRPC (`OTLPSpanExporter`); the standard OTEL_* environment variables
(OTEL_TRACES_SAMPLER, OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_HEADERS, ...) apply.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from grpc import aio

from serving.calls import TRACEPARENT, Call

log = logging.getLogger(__name__)

MAX_TRACE_HEADER_CHARS = 512  # a traceparent is 55 characters, a tracestate at most 512 (W3C)

_tracer: Any = None  # an opentelemetry Tracer once set up
_provider: Any = None
_propagator: Any = None


def enabled() -> bool:
    return _tracer is not None


def setup_tracing(service: str, endpoint: str = "", exporter: Any = None, instance: str = "") -> bool:
    """Exports this process's spans over OTLP/gRPC to `endpoint` (`http://collector:4317`; `https://` for
    TLS), or to `exporter` (a SpanExporter, synchronously: tests). Without either, tracing stays off.
    Returns whether it is on."""
    global _tracer, _provider, _propagator
    if not endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {"service.name": f"eesd-{service}", "service.namespace": "eesd"}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        atexit.register(provider.shutdown)  # the last batch goes out when the service stops
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = provider, provider.get_tracer("eesd")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing on: spans of eesd-%s go to %s", service, endpoint or type(exporter).__name__)
    return True


def shutdown_tracing() -> None:
    """Flushes and turns tracing off (tests; a service flushes at exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _context_from(carrier: Mapping[str, str]) -> Any:
    """The remote parent a W3C carrier names (None: no valid one, the span starts a trace)."""
    carrier = {k: v for k, v in carrier.items() if v and len(v) <= MAX_TRACE_HEADER_CHARS}
    return _propagator.extract(carrier) if TRACEPARENT in carrier else None


@contextlib.contextmanager
def server_span(call: Call) -> Iterator[None]:
    """A SERVER span around a served call (`call.traced`: an RPC of an eesd service, a request to the HTTP API),
    the child of the W3C traceparent it came with; its status is the one `call.status` holds at the end."""
    if _tracer is None or not call.traced:
        yield
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    with _tracer.start_as_current_span(
        call.span_name,
        context=_context_from(call.carrier),
        kind=SpanKind.SERVER,
        attributes=call.span_attributes(),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        finally:
            span.set_attributes(call.status_attributes())
            if call.failed:
                span.set_status(Status(StatusCode.ERROR, call.status_name))


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, traceparent: str = "") -> Iterator[Any]:
    """An INTERNAL span, current inside the block; its parent is `traceparent` when that is a valid W3C
    traceparent, else the current span. Yields the span (None when tracing is off) for `annotate`."""
    if _tracer is None:
        yield None
        return
    parent = _context_from({TRACEPARENT: traceparent}) if traceparent else None
    with _tracer.start_as_current_span(name, context=parent, attributes=dict(attributes or {})) as current:
        yield current


def annotate(target: Any = None, **attributes: Any) -> None:
    """Sets attributes on `target` (a span from `span`), or on the current span; a no-op when off."""
    if _tracer is None:
        return
    if target is None:
        from opentelemetry import trace

        target = trace.get_current_span()
    target.set_attributes({k: v for k, v in attributes.items() if v is not None})


def traceparent() -> str:
    """The current span's W3C traceparent ("" when tracing is off or no span is current)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None when off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _with_trace(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if not carrier:
        return details
    metadata = aio.Metadata(*(details.metadata or ()), *carrier.items())
    return aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# Each adds the current span's traceparent (and tracestate) to an outgoing call's metadata. One class per
# kind of call: a grpc.aio channel files an interceptor object under the first kind it implements only.
class _TraceUnaryUnary(aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_trace(client_call_details), request)


class _TraceUnaryStream(aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_trace(client_call_details), request)


def client_interceptors() -> list[aio.ClientInterceptor]:
    """What an internal channel needs to carry trace context (unary and server-streaming calls; a
    VerifyStream carries it per message): nothing while tracing is off."""
    return [_TraceUnaryUnary(), _TraceUnaryStream()] if _tracer is not None else []
