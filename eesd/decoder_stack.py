"""A lean forward path over a subset of a model's decoder layers and a position-pointer KV cache.

The drafter's stack is embeddings -> layers 0..N-1 -> exit layer -> norm -> head; the verifier's is the
whole model. Both hold the transformers layer modules (their weights and state dicts are the model's
own) but skip `generate()` and the per-call mask and cache machinery.

Decoding a few tokens at a time on a CPU is bound by per-op Python overhead, not by arithmetic, so
`LeanLayer` runs a Llama-family decoder layer op for op as transformers does (same RMSNorm, rotary and
SDPA arithmetic) without its wrappers: q/k/v and gate/up are each one matmul over weights stored
contiguously (the modules' parameters become views of the fused tensors, so nothing is duplicated),
and cos/sin come from a table computed once. `lean=False` runs the transformers modules instead.
"""

import inspect

import torch
import torch.nn.functional as F
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


def cache_keyword(layer: nn.Module) -> str:
    """The name under which a transformers decoder layer takes its cache: `cache` since transformers 5.24
    (which deprecates `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm/Qwen2RMSNorm/MistralRMSNorm, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates the linears' weights (and biases) and makes each module's parameters views of them."""
    weight = torch.cat([m.weight.data for m in linears])
    has_bias = [m.bias is not None for m in linears]
    bias = torch.cat([m.bias.data for m in linears]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse linears of which only some have a bias")
    start = 0
    for m in linears:
        end = start + m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def supports_lean(layer: nn.Module) -> bool:
    """The layer has exactly the Llama-family structure LeanLayer computes (no q/k norms, no extras)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = {n for n, _ in layer.named_children()}
    return (
        names == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
        and {n for n, _ in attn.named_children()} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        and {n for n, _ in mlp.named_children()} <= {"gate_proj", "up_proj", "down_proj", "act_fn"}
    )


class LeanLayer:
    """One decoder layer's forward over the new positions, writing its keys and values into the cache."""

    def __init__(self, layer: nn.Module, slot: int, config: PretrainedConfig):
        attn, mlp = layer.self_attn, layer.mlp
        self.slot = slot
        self.ln1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.ln2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.gqa = config.num_attention_heads != config.num_key_value_heads
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_split = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
        self.o = (attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.down = (mlp.down_proj.weight, mlp.down_proj.bias)
        self.act = mlp.act_fn

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """hidden: (1, q, d); cos, sin: (1, 1, q, head_dim); mask: (1, 1, q, past + q) bool or None."""
        q_len = hidden.shape[1]
        x = rms_norm(hidden, *self.ln1)
        query, key, value = F.linear(x, *self.qkv).split(self.qkv_split, dim=-1)
        query = query.view(1, q_len, -1, self.head_dim).transpose(1, 2)  # (1, heads, q, hd)
        key = key.view(1, q_len, -1, self.head_dim).transpose(1, 2)  # (1, kv_heads, q, hd)
        value = value.view(1, q_len, -1, self.head_dim).transpose(1, 2)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        key, value = cache.update(key, value, self.slot)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa
        )  # (1, heads, q, hd)
        hidden = hidden + F.linear(out.transpose(1, 2).reshape(1, q_len, -1), *self.o)
        x = rms_norm(hidden, *self.ln2)
        gate, up = F.linear(x, *self.gate_up).split(self.intermediate, dim=-1)
        return hidden + F.linear(self.act(gate) * up, *self.down)


class DecoderStack(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        embed: nn.Embedding,
        layers: list[nn.Module],
        norm: nn.Module,
        lm_head: nn.Linear,
        rotary: nn.Module,
        lean: bool = True,
    ):
        super().__init__()
        self.config = config
        self.embed_tokens = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary
        self._windows = [attention_window(layer, config) for layer in layers]
        self.lean = lean and all(supports_lean(layer) for layer in layers)
        self._lean_layers = [LeanLayer(layer, slot, config) for slot, layer in enumerate(layers)] if self.lean else []
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache_kwarg = cache_keyword(layers[0]) if layers else "past_key_values"

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, past: int, num_new: int):
        """cos, sin (1, q, head_dim) of the positions: from a table for the default (static) rope."""
        rope_type = getattr(self.rotary_emb, "rope_type", "default")
        if rope_type != "default" or past + num_new > 8192:
            return self.rotary_emb(hidden, positions)
        if self._rope_table is None or self._rope_table[0].shape[1] < past + num_new:
            size = min(8192, max(2 * (past + num_new), 1024, self.config.max_position_embeddings))
            table_positions = torch.arange(size, device=hidden.device)[None]
            self._rope_table = self.rotary_emb(hidden, table_positions)
        cos, sin = self._rope_table
        return cos[:, past : past + num_new], sin[:, past : past + num_new]

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
        masks = {w: causal_mask(num_new, past, w, device) for w in set(self._windows)}
        if self.lean:
            cos, sin = self._rope(hidden, positions, past, num_new)
            cos, sin = cos[:, None], sin[:, None]  # (1, 1, q, head_dim): broadcast over heads
            for layer, window in zip(self._lean_layers, self._windows, strict=True):
                hidden = layer(hidden, cos, sin, masks[window], cache)
        else:
            position_embeddings = self.rotary_emb(hidden, positions)
            for layer, window in zip(self.layers, self._windows, strict=True):
                hidden = layer(
                    hidden,
                    attention_mask=masks[window],
                    position_ids=positions,
                    **{self._cache_kwarg: cache},
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
    lean: bool = True,
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
    # Modules move to the device before the stack is built: the lean layers fuse weights where they live.
    # (A tied head keeps sharing the embedding's Parameter, which .to() converts in place.)
    modules = [m.to(device).requires_grad_(False) for m in (embed, *layers, norm, lm_head, rotary(config=config))]
    embed, *layers, norm, lm_head, rotary_emb = modules
    return DecoderStack(config, embed, layers, norm, lm_head, rotary_emb, lean).eval()


def resident_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters, tied tensors counted once."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}.values())
