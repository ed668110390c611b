"""A lean forward path over a subset of a model's decoder layers and a position-pointer KV cache.

The drafter's stack is embeddings -> layers 0..N-1 -> exit layer -> norm -> head; the verifier's is the
whole model. Both reuse the transformers layer modules (so the numerics are the model's own) but skip
`generate()` and the per-call mask and cache machinery.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from eesd.checkpoint import CheckpointReader, modeling_module
from eesd.kv_cache import KVCache


def attention_window(layer: nn.Module, config: PretrainedConfig) -> int | None:
    """Sliding-window size of a layer's attention, None for full attention (Qwen2 per layer, Mistral global)."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None) if config.model_type == "mistral" else None


def causal_mask(num_new: int, past: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(1, 1, num_new, past + num_new) bool mask, True where attention is allowed; None when all is allowed."""
    if num_new == 1 and (window is None or past < window):
        return None
    query_pos = torch.arange(past, past + num_new, device=device)[:, None]
    key_pos = torch.arange(past + num_new, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed[None, None]


class DecoderStack(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        embed: nn.Embedding,
        layers: list[nn.Module],
        norm: nn.Module,
        lm_head: nn.Linear,
        rotary: nn.Module,
    ):
        super().__init__()
        self.config = config
        self.embed_tokens = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary
        self._windows = [attention_window(layer, config) for layer in layers]

    def new_cache(self, capacity: int = 256) -> KVCache:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVCache(
            len(self.layers),
            cfg.num_key_value_heads,
            head_dim,
            self.embed_tokens.weight.dtype,
            self.embed_tokens.weight.device,
            capacity,
            cfg.max_position_embeddings,
        )

    @torch.inference_mode()
    def forward(self, input_ids: list[int], cache: KVCache, logits_from: int = 0) -> torch.Tensor:
        """Feeds `input_ids` at positions cache.length.. and returns logits (len - logits_from, vocab).

        Only positions >= logits_from go through norm and head: a prefill needs the last row only.
        """
        device = self.embed_tokens.weight.device
        past, num_new = cache.length, len(input_ids)
        cache.begin(num_new)
        ids = torch.tensor([input_ids], device=device)  # (1, q)
        positions = torch.arange(past, past + num_new, device=device)[None]  # (1, q)
        hidden = self.embed_tokens(ids)  # (1, q, d)
        position_embeddings = self.rotary_emb(hidden, positions)
        masks = {w: causal_mask(num_new, past, w, device) for w in set(self._windows)}
        for layer, window in zip(self.layers, self._windows, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=positions,
                past_key_values=cache,
                position_embeddings=position_embeddings,
            )
        cache.commit()
        return self.lm_head(self.norm(hidden[0, logits_from:]))  # (q - logits_from, vocab)


def build_stack(
    config: PretrainedConfig,
    reader: CheckpointReader,
    layer_ids: list[int],
    dtype: torch.dtype,
    device: str,
    extra_layers: list[dict[str, torch.Tensor]] = (),
) -> DecoderStack:
    """Builds a stack holding only embeddings, the given checkpoint layers, `extra_layers` (state dicts
    of layers appended after them, e.g. the exit layer), the final norm and the head.

    Modules are created on the meta device and take their tensors from disk, so nothing else is allocated.
    """
    module, prefix = modeling_module(config)
    decoder_layer, rms_norm, rotary = (
        getattr(module, f"{prefix}{n}") for n in ("DecoderLayer", "RMSNorm", "RotaryEmbedding")
    )
    # Every layer is built as the model's last layer so per-layer attention types match a copy of it;
    # the cache slot is then its position in this stack.
    states = [reader.read_prefix(f"model.layers.{i}.", dtype) for i in layer_ids] + list(extra_layers)
    source_ids = list(layer_ids) + [config.num_hidden_layers - 1] * len(extra_layers)
    layers = []
    for slot, (source_idx, state) in enumerate(zip(source_ids, states, strict=True)):
        with torch.device("meta"):
            layer = decoder_layer(config, source_idx)
        layer.load_state_dict(state, assign=True, strict=True)
        layer.self_attn.layer_idx = slot
        layers.append(layer)
    with torch.device("meta"):
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        norm = rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    embed.load_state_dict(reader.read_prefix("model.embed_tokens.", dtype), assign=True)
    norm.load_state_dict(reader.read_prefix("model.norm.", dtype), assign=True)
    if reader.has("lm_head.weight"):
        lm_head.load_state_dict(reader.read_prefix("lm_head.", dtype), assign=True)
    elif config.tie_word_embeddings:
        lm_head.weight = embed.weight
    else:
        raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
    stack = DecoderStack(config, embed, layers, norm, lm_head, rotary(config=config))
    return stack.to(device).eval().requires_grad_(False)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters, tied tensors counted once."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}.values())
