from dataclasses import dataclass

from eesd.errors import InvalidArgument
from serving.addresses import parse_addresses
from serving.config import ModelNodeConfig, field


@dataclass(frozen=True)
class DrafterConfig(ModelNodeConfig):
    """Drafter: layers 0..N-1 plus the early-exit layer; drafts and streams blocks to the verifier."""

    exit_layer: int = field(0, "N: the drafter runs layers 0..N-1, then the exit layer")
    exit_head: str = field("", "trained exit-head directory (empty: untrained copy of the last layer)")
    draft_top_k: int = field(32, "size K of the sparse draft distribution q shipped when sampling")
    verify_timeout_s: float = field(30.0, "deadline for a verifier's answer to one round")
    verifiers: str = field(
        "", "verifier addresses host:port,... this drafter may stream to (a host stands for all it resolves to)"
    )
    pipeline: bool = field(True, "draft round r+1 while round r is verified, when the node has nothing else to do")

    def validate(self) -> None:
        super().validate()
        if self.exit_layer < 1:
            raise InvalidArgument("exit_layer", "is required and must be >= 1 (--exit-layer or EESD_EXIT_LAYER)")
        if not self.verifiers:
            raise InvalidArgument(
                "verifiers", "is required: the verifiers this drafter may stream to (--verifiers or EESD_VERIFIERS)"
            )
        try:
            parse_addresses(self.verifiers)
        except ValueError as err:
            raise InvalidArgument("verifiers", str(err)) from err
