"""Reading local Hugging Face checkpoints of the Llama family, tensor by tensor.

Only the tensors a node runs are read from disk (safetensors is memory-mapped), so a drafter never
materialises the layers it does not hold.
"""

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from eesd.errors import InvalidArgument

# model_type -> class-name prefix in transformers.models.<type>.modeling_<type>
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
# Fields that do not change what the network computes; left out of the identity hash.
_CONFIG_HASH_IGNORED = {
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "architectures",
    "_attn_implementation_autoset",
    "use_cache",
}


def load_config(model_dir: str | Path) -> PretrainedConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InvalidArgument("model_dir", f"no Hugging Face checkpoint (config.json) at {str(path)!r}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            "model_dir", f"model_type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    # Our forward passes explicit boolean masks, which the SDPA kernel takes and eager attention does not.
    config._attn_implementation = "sdpa"
    return config


def config_hash(config: PretrainedConfig) -> str:
    """Stable hash of what determines the network's function; the exit layer and the handshake carry it."""
    items = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_HASH_IGNORED and not k.startswith("_")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def modeling_module(config: PretrainedConfig) -> tuple[ModuleType, str]:
    """The transformers module implementing this architecture, and its class-name prefix."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return module, SUPPORTED_MODEL_TYPES[config.model_type]


@dataclass
class CheckpointReader:
    """Maps tensor names to the safetensors file holding them (single file or sharded index)."""

    model_dir: Path
    files: dict[str, Path]

    @classmethod
    def open(cls, model_dir: str | Path) -> "CheckpointReader":
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(root, {name: root / shard for name, shard in weight_map.items()})
        single = root / "model.safetensors"
        if not single.is_file():
            raise InvalidArgument("model_dir", f"no model.safetensors or sharded index in {str(root)!r}")
        with safe_open(single, framework="pt") as f:
            return cls(root, {name: single for name in f.keys()})

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).to(dtype)
        return out

    def read_prefix(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, with the prefix stripped (a submodule's state dict)."""
        names = [n for n in self.files if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.read(names, dtype).items()}
