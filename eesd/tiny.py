"""Tiny random checkpoints of each supported architecture, written to disk like real ones.

No model hub is reachable here; tests and the first demo build these in seconds and load them back
through the same path as a real checkpoint.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

_BASE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    # Wide weights give well-separated logits: fp32 argmax ties would make equality tests flaky.
    initializer_range=0.25,
)

ARCHITECTURES = {
    "llama": lambda **kw: LlamaConfig(**{**_BASE, **kw}),
    # Grouped-query attention with biases on q/k/v, tied embeddings.
    "qwen2": lambda **kw: Qwen2Config(**{**_BASE, "num_key_value_heads": 2, "tie_word_embeddings": True, **kw}),
    # A sliding window shorter than long prompts, so the windowed mask is exercised.
    "mistral": lambda **kw: MistralConfig(**{**_BASE, "num_key_value_heads": 2, "sliding_window": 48, **kw}),
}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    return ARCHITECTURES[arch](**overrides)


def save_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Writes a random model of `arch` as a safetensors checkpoint directory and returns it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
