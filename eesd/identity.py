"""Model identity exchanged in the drafter/verifier handshake: they refuse to pair when it differs."""

from dataclasses import dataclass

from eesd.errors import FailedPrecondition


@dataclass(frozen=True)
class ModelIdentity:
    model_type: str
    config_hash: str
    tokenizer_hash: str
    dtype: str
    exit_layer: int = 0  # drafter only: N
    exit_head_hash: str = ""  # drafter only

    def check_pairs_with(self, verifier: "ModelIdentity") -> None:
        """Raises FailedPrecondition naming every field on which a drafter and a verifier disagree."""
        shared = ("model_type", "config_hash", "tokenizer_hash", "dtype")
        diffs = [
            f"{f}: {getattr(self, f)!r} != {getattr(verifier, f)!r}"
            for f in shared
            if getattr(self, f) != getattr(verifier, f)
        ]
        if diffs:
            raise FailedPrecondition("drafter and verifier serve different models; " + "; ".join(diffs))
