"""Model identity exchanged in the drafter/verifier handshake: they refuse to pair when it differs. Torch-free:
the controller checks the nodes against the checkpoint it reads the tokenizer from."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from eesd.errors import FailedPrecondition


def tokenizer_hash(model_dir: str | Path) -> str:
    """Hash of the tokenizer files, empty when the checkpoint ships none (id-only use)."""
    digest = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(path.read_bytes())
            found = True
    return digest.hexdigest()[:16] if found else ""


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

    def check_checkpoint(self, model_type: str, tokenizer_hash: str) -> None:
        """Raises FailedPrecondition unless this node serves a checkpoint of `model_type` with the tokenizer
        whose files hash to `tokenizer_hash` (what a controller knows of the checkpoint it reads)."""
        diffs = [
            f"{name}: {mine!r} != {theirs!r}"
            for name, mine, theirs in (
                ("model_type", self.model_type, model_type),
                ("tokenizer_hash", self.tokenizer_hash, tokenizer_hash),
            )
            if mine != theirs
        ]
        if diffs:
            raise FailedPrecondition("the node serves another model than the controller's; " + "; ".join(diffs))
