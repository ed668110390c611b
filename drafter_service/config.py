from dataclasses import dataclass

from eesd.errors import InvalidArgument
from serving.config import field


@dataclass(frozen=True)
class DrafterConfig:
    """Drafter: layers 0..N-1 plus the early-exit layer; drafts and streams blocks to the verifier."""

    host: str = field("0.0.0.0", "address to listen on")
    port: int = field(50061, "gRPC port")
    metrics_port: int = field(9101, "Prometheus /metrics port (0: off)")
    model_dir: str = field("", "Hugging Face checkpoint directory")
    exit_layer: int = field(0, "N: the drafter runs layers 0..N-1, then the exit layer")
    exit_head: str = field("", "trained exit-head directory (empty: untrained copy of the last layer)")
    dtype: str = field("float32", "float32, bfloat16, float16 or auto")
    device: str = field("cpu", "cpu or cuda")
    max_sessions: int = field(256, "KV caches kept at once; more is RESOURCE_EXHAUSTED")
    draft_top_k: int = field(32, "size K of the sparse draft distribution q shipped when sampling")
    verify_timeout_s: float = field(30.0, "deadline for a verifier's answer to one round")
    pipeline: bool = field(True, "draft round r+1 while round r is verified, when the node has nothing else to do")
    node_id: str = field("", "name in handshakes and metrics (default host:port)")
    grace_s: float = field(10.0, "seconds in-flight rounds get to finish on SIGTERM")

    def validate(self) -> None:
        if not self.model_dir:
            raise InvalidArgument("model_dir", "is required (--model-dir or EESD_MODEL_DIR)")
        if self.exit_layer < 1:
            raise InvalidArgument("exit_layer", "is required and must be >= 1 (--exit-layer or EESD_EXIT_LAYER)")
