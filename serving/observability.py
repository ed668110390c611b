"""What every service sets up first, from the observability fields of its config (serving.config
ObservabilityConfig): its log lines (serving/logs.py), its tracing (serving/tracing.py) and the `model_name`
label of its vllm: metrics (serving/metrics.py); and the one rule by which all three watch a served call,
gRPC or HTTP (`observed`). docs/observability.md describes them."""

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eesd.fetch import hub_model
from serving import logs, metrics, tracing
from serving.calls import Call


def model_name_of(config: Any) -> str:
    """The served model's name: `served_model_name`, else the name of `model_dir`'s folder or the repository
    of its Hugging Face id (org/name), else "eesd" (a controller without a model directory); the
    controller's HTTP API serves the model under the same name."""
    name, model_dir = getattr(config, "served_model_name", ""), getattr(config, "model_dir", "") or ""
    hub = hub_model(model_dir)
    return name or (hub[0] if hub else Path(model_dir).name) or "eesd"


def setup(config: Any, service: str) -> None:
    """Logs (format and level), the metrics' model_name and, with an `otlp_endpoint`, tracing of `service`
    ("controller", "drafter" or "verifier"); called once, before the service records anything."""
    logs.setup_logging(service, config.log_level, config.log_format)
    metrics.set_model_name(model_name_of(config))
    instance = getattr(config, "node_id", "") or f"{config.host}:{config.port}"
    tracing.setup_tracing(service, config.otlp_endpoint, instance=instance)


@contextlib.contextmanager
def observed(call: Call) -> Iterator[Call]:
    """Everything that watches a served call (serving.errors opens it for every RPC, controller.http_api for
    every HTTP request): its status and time in the metrics, its span (tracing on), its access line (the
    controller's public API), each reading the status `call.status` holds when the call ends. A call the
    client went away from ends as its protocol says (CANCELLED, HTTP 499), here, once, for all three."""
    with metrics.rpc_metrics().served(call), tracing.server_span(call), logs.access_scope(call):
        try:
            yield call
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            call.client_gone()
            raise
