"""The SDK carries the caller's W3C trace context to the controller (gRPC metadata `traceparent`), so the
server's spans join the caller's trace: given explicitly, or taken from OpenTelemetry's current span."""

from __future__ import annotations

import asyncio

import pytest
from client_fakes import PROMPT_IDS, Server
from eesd_client import AsyncEesdClient, EesdClient, InvalidArgumentError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import use_span

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_an_explicit_traceparent_reaches_the_controller(controller: Server) -> None:
    with EesdClient(controller.address, timeout=10) as client:
        client.generate_text(PROMPT_IDS, max_new_tokens=3, traceparent=TRACEPARENT)
        client.generate_text(PROMPT_IDS, max_new_tokens=3)
    first, second = controller.fake.metadata[-2:]
    assert first["traceparent"] == TRACEPARENT
    assert "traceparent" not in second  # no OpenTelemetry span is current


def test_the_asyncio_client_sends_it_too(controller: Server) -> None:
    async def main() -> None:
        async with AsyncEesdClient(controller.address, timeout=10) as client:
            await client.generate_text(PROMPT_IDS, max_new_tokens=3, traceparent=TRACEPARENT)

    asyncio.run(main())
    assert controller.fake.metadata[-1]["traceparent"] == TRACEPARENT


def test_the_current_opentelemetry_span_is_the_parent(controller: Server) -> None:
    span = TracerProvider().get_tracer("app").start_span("caller")
    with use_span(span, end_on_exit=True), EesdClient(controller.address, timeout=10) as client:
        client.generate_text(PROMPT_IDS, max_new_tokens=3)
    context = span.get_span_context()
    sent = controller.fake.metadata[-1]["traceparent"]
    assert sent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")  # then the trace flags


@pytest.mark.parametrize("bad", ["", "00-abc", TRACEPARENT.upper(), "ff" + TRACEPARENT[2:], TRACEPARENT + "\n"])
def test_a_malformed_traceparent_is_refused_before_any_call(controller: Server, bad: str) -> None:
    with EesdClient(controller.address, timeout=10) as client, pytest.raises(InvalidArgumentError):
        client.generate(PROMPT_IDS, max_new_tokens=3, traceparent=bad)
    assert controller.fake.generate_attempts == 0
