from dataclasses import dataclass

from serving.config import ModelNodeConfig, field


@dataclass(frozen=True)
class VerifierConfig(ModelNodeConfig):
    """Verifier: the full model; checks draft blocks in one forward pass."""

    port: int = field(50062, "gRPC port")
    metrics_port: int = field(9102, "Prometheus /metrics port (0: off)")
