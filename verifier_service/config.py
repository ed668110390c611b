from dataclasses import dataclass

from eesd.errors import InvalidArgument
from serving.config import field


@dataclass(frozen=True)
class VerifierConfig:
    """Verifier: the full model; checks draft blocks in one forward pass."""

    host: str = field("0.0.0.0", "address to listen on")
    port: int = field(50062, "gRPC port")
    metrics_port: int = field(9102, "Prometheus /metrics port (0: off)")
    model_dir: str = field("", "Hugging Face checkpoint directory")
    dtype: str = field("float32", "float32, bfloat16, float16 or auto")
    device: str = field("cpu", "cpu or cuda")
    max_sessions: int = field(256, "KV caches kept at once; more is RESOURCE_EXHAUSTED")
    node_id: str = field("", "name in handshakes and metrics (default host:port)")
    grace_s: float = field(10.0, "seconds in-flight rounds get to finish on SIGTERM")

    def validate(self) -> None:
        if not self.model_dir:
            raise InvalidArgument("model_dir", "is required (--model-dir or EESD_MODEL_DIR)")
