"""Fixtures of the unit tests."""

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eesd.drafter import Drafter
from eesd.verifier import Verifier
from serving import tracing
from tests.openai_helpers import servable_model


@pytest.fixture
def spans():
    """Tracing on for one test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.setup_tracing("test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory):
    """A tiny Llama the HTTP front end can serve (tokenizer, chat template), per test module."""
    return servable_model(tiny_models["llama"], tmp_path_factory.mktemp("servable") / "tiny")


@pytest.fixture(scope="module")
def nodes(model):
    """In-process nodes of `model`, by address: one drafter (N = 2), one verifier."""
    return {"d1:1": Drafter(model, 2), "v1:1": Verifier(model)}
