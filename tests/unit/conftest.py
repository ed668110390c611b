"""Fixtures of the unit tests."""

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving import tracing


@pytest.fixture
def spans():
    """Tracing on for one test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.setup_tracing("test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()
