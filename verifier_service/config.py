from dataclasses import dataclass

from serving.config import PORT, PORT_OR_OFF, ModelNodeConfig, field


@dataclass(frozen=True)
class VerifierConfig(ModelNodeConfig):
    """Verifier: the full model; checks draft blocks in one forward pass."""

    port: int = field(50062, "gRPC port", **PORT)
    metrics_port: int = field(9102, "Prometheus /metrics port (0: off)", **PORT_OR_OFF)
