from dataclasses import dataclass

from serving.config import ADDRESSES, ModelNodeConfig, field


@dataclass(frozen=True)
class DrafterConfig(ModelNodeConfig):
    """Drafter: layers 0..N-1 plus the early-exit layer; drafts and streams blocks to the verifier."""

    exit_layer: int = field(0, "N: the drafter runs layers 0..N-1, then the exit layer", minimum=1)
    exit_head: str = field("", "trained exit-head directory (empty: untrained copy of the last layer)")
    draft_top_k: int = field(32, "size K of the sparse draft distribution q shipped when sampling", minimum=1)
    verify_timeout_s: float = field(30.0, "deadline for a verifier's answer to one round", exclusive_minimum=0)
    verifiers: str = field(
        "",
        "verifier addresses host:port,... this drafter may stream to (a host stands for all it resolves to)",
        required=True,
        pattern=ADDRESSES,
    )
    pipeline: bool = field(True, "draft round r+1 while round r is verified, when the node has nothing else to do")
