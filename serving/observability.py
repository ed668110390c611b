"""What every service sets up first, from the observability fields of its config (serving.config
ObservabilityConfig): its log lines (serving/logs.py), its tracing (serving/tracing.py) and the `model_name`
label of its vllm: metrics (serving/metrics.py). docs/observability.md describes all three."""

from pathlib import Path
from typing import Any

from serving import logs, metrics, tracing


def model_name_of(config: Any) -> str:
    """The served model's name: `served_model_name`, else the name of `model_dir`'s folder, else "eesd" (a
    controller without a model directory); the controller's HTTP API serves the model under the same name."""
    name = getattr(config, "served_model_name", "")
    return name or Path(getattr(config, "model_dir", "") or "").name or "eesd"


def setup(config: Any, service: str) -> None:
    """Logs (format and level), the metrics' model_name and, with an `otlp_endpoint`, tracing of `service`
    ("controller", "drafter" or "verifier"); called once, before the service records anything."""
    logs.setup_logging(service, config.log_level, config.log_format)
    metrics.set_model_name(model_name_of(config))
    instance = getattr(config, "node_id", "") or f"{config.host}:{config.port}"
    tracing.setup_tracing(service, config.otlp_endpoint, instance=instance)
