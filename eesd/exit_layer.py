"""The early-exit layer: one decoder layer on top of layer N-1, saved and loaded on its own.

An exit-head directory holds `exit_layer.safetensors` (the layer's state dict) and `exit_layer.json`
(N, the base model's config hash, provenance). An untrained exit layer is a copy of the model's last
decoder layer (docs/architecture.md §4); with N = L-1 it reproduces the full model exactly.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from eesd.checkpoint import CheckpointReader, config_hash
from eesd.errors import InvalidArgument

WEIGHTS_FILE = "exit_layer.safetensors"
META_FILE = "exit_layer.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExitLayerMeta:
    exit_layer: int  # N: the exit layer reads the hidden states after layers 0..N-1
    base_config_hash: str
    model_type: str
    trained: bool
    format_version: int = FORMAT_VERSION


def validate_exit_layer(n: int, config: PretrainedConfig) -> None:
    if not 1 <= n <= config.num_hidden_layers - 1:
        raise InvalidArgument(
            "exit_layer",
            f"must be in 1..{config.num_hidden_layers - 1} for a model with {config.num_hidden_layers} layers, got {n}",
        )


def untrained_exit_layer(
    reader: CheckpointReader, config: PretrainedConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """State dict of a fresh exit layer: a copy of the model's last decoder layer."""
    return reader.read_prefix(f"model.layers.{config.num_hidden_layers - 1}.", dtype)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_exit_head(out_dir: str | Path, state: dict[str, torch.Tensor], meta: ExitLayerMeta) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return out


def load_exit_head(
    head_dir: str | Path, config: PretrainedConfig, n: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Loads an exit head and refuses one trained for another model or another N."""
    head = Path(head_dir)
    if not (head / META_FILE).is_file() or not (head / WEIGHTS_FILE).is_file():
        raise InvalidArgument("exit_head", f"no {META_FILE} + {WEIGHTS_FILE} in {str(head)!r}")
    meta = ExitLayerMeta(**json.loads((head / META_FILE).read_text()))
    if meta.exit_layer != n:
        raise InvalidArgument("exit_layer", f"exit head {str(head)!r} was trained for N={meta.exit_layer}, not {n}")
    if meta.base_config_hash != config_hash(config):
        raise InvalidArgument(
            "exit_head",
            f"exit head {str(head)!r} belongs to a model with config hash "
            f"{meta.base_config_hash}, not {config_hash(config)}",
        )
    return {k: v.to(dtype) for k, v in load_file(str(head / WEIGHTS_FILE)).items()}
