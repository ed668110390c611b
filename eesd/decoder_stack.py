"""A lean forward path over a subset of a model's decoder layers and a position-pointer KV cache.

The drafter's stack is embeddings -> layers 0..N-1 -> exit layer -> norm -> head; the verifier's is the
whole model. Both hold the transformers layer modules (their weights and state dicts are the model's
own) but skip `generate()` and the per-call mask and cache machinery.

Decoding a few tokens at a time on a CPU is bound by per-op Python overhead, not by arithmetic, so
`LeanLayer` runs a Llama-family decoder layer op for op as transformers does (same RMSNorm, rotary and
SDPA arithmetic) without its wrappers: q/k/v and gate/up are each one matmul over weights stored
contiguously (the modules' parameters become views of the fused tensors, so nothing is duplicated),
and cos/sin come from a table computed once. `lean=False` runs the transformers modules instead.

A pass serves several sessions at once (`forward_batch`), each with its own new tokens and cache
length. Their tokens are packed into one (T, d) batch: embeddings, norms, q/k/v, o, MLP and head are
one matmul over all T tokens, and attention runs per row over that row's cache in the pool
(`eesd.kv_cache`), which it reads in place: no padding, no copies. A GPU varlen or paged attention
kernel can replace that per-row loop. The alternative, a padded (B, Q, d) batch with per-row positions
and masks, needs every row's cache gathered into one (B, kv_heads, longest, head_dim) tensor per layer
for its single attention call, and lost to packing everywhere. Milliseconds per pass, 1 thread, best of
30, Llama-shaped random weights, rows at ragged cache lengths 32..440:

    new tokens  rows   d=64, 4 layers (tiny)           d=512, 8 layers
    per row            one at a time  packed  padded   one at a time  packed  padded
    1           1       0.33          0.33    0.48       8.2           8.1     9.1
    1           4       1.30          0.59    1.00      31.6          12.3    16.8
    1           16      5.45          1.41    2.67     139.0          26.2    42.9
    6           1       0.44          0.44    0.58      14.2          13.9    15.1
    6           4       1.77          0.94    1.17      63.4          28.7    31.4
    6           16      7.26          2.77    4.24     243.2          79.4   111.7

The single-session `forward` is `forward_batch` of one row, and as fast as the batch-1 path it replaced
(same process, interleaved, one session at context 150: 0.359 vs 0.359 ms tiny, 8.50 vs 8.51 ms d=512,
5.82 vs 5.84 ms for the reference model's shape in bf16, 1 new token). `lean=False` runs the rows one
at a time through the transformers modules, which take one sequence and one cache object per call.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from eesd.checkpoint import CheckpointReader, modeling_module
from eesd.kv_cache import KVCache, KVPool


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


@dataclass
class Row:
    """One session's part of a forward pass: its new tokens, fed at positions cache.length.., and
    the first of them whose logits it wants (a prefill needs the last one only)."""

    input_ids: list[int]
    cache: KVCache
    logits_from: int = 0


@dataclass
class PackedPass:
    """Where each row's tokens lie in the packed batch and in the pool, computed once per pass."""

    pool: KVPool
    spans: list[tuple[int, int]]  # each row's [start, end) in the packed tokens
    pasts: list[int]  # each row's cache length before the pass
    reads: list[slice | torch.Tensor]  # each row's pool slots of positions [0, past + new)
    positions: torch.Tensor  # (T,) position of each new token in its own sequence
    slots: torch.Tensor  # (T,) pool slot each new token's key and value go to
    longest: int  # the longest row's past + new


def pack(rows: list[Row]) -> PackedPass:
    """The layout of a pass over `rows`, which must be distinct sessions of one pool."""
    caches = [row.cache for row in rows]
    pool = caches[0].pool
    if any(cache.pool is not pool for cache in caches) or len({id(c) for c in caches}) < len(caches):
        raise ValueError("a batched pass takes distinct sessions of one pool")
    spans, pasts, reads, positions, slots, offset = [], [], [], [], [], 0
    for row, cache in zip(rows, caches, strict=True):
        past, num_new = cache.length, len(row.input_ids)
        spans.append((offset, offset + num_new))
        pasts.append(past)
        reads.append(cache.slots(0, past + num_new))
        positions.extend(range(past, past + num_new))
        slots.append(cache.table[past : past + num_new])
        offset += num_new
    longest = max(past + end - start for past, (start, end) in zip(pasts, spans, strict=True))
    positions_t = torch.tensor(positions, device=pool.keys.device)
    return PackedPass(pool, spans, pasts, reads, positions_t, _cat(slots, 0), longest)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, except that a lone part is returned as it is (cat would copy it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _read(pool_layer: torch.Tensor, read: slice | torch.Tensor) -> torch.Tensor:
    """pool_layer: (kv_heads, pool, hd) -> (1, kv_heads, len(read), hd): a view for a slice, else one
    index_select (advanced indexing gathers the same 6-10x slower here: 13 vs 2 us over 100 positions)."""
    return pool_layer[None, :, read] if isinstance(read, slice) else pool_layer.index_select(1, read)[None]


class LeanLayer:
    """One decoder layer's forward over a packed batch of new positions, writing their keys and values
    into the pool."""

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
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: PackedPass,
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """hidden: (T, d) new positions of all rows; cos, sin: (T, head_dim); masks: one per row,
        (1, 1, new, past + new) bool or None."""
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, *self.ln1)
        query, key, value = F.linear(x, *self.qkv).split(self.qkv_split, dim=-1)
        query = query.view(num_tokens, -1, self.head_dim).transpose(0, 1)  # (heads, T, hd)
        key = key.view(num_tokens, -1, self.head_dim).transpose(0, 1)  # (kv_heads, T, hd)
        value = value.view(num_tokens, -1, self.head_dim).transpose(0, 1)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        keys, values = batch.pool.layer_keys[self.slot], batch.pool.layer_values[self.slot]  # (kv_heads, pool, hd)
        keys.index_copy_(1, batch.slots, key)
        values.index_copy_(1, batch.slots, value)
        # Attention per row over its own cache: no padding, and a scattered cache is gathered once per layer.
        out = _cat(
            [
                F.scaled_dot_product_attention(
                    query[None, :, start:end],  # (1, heads, new, hd)
                    _read(keys, read),  # (1, kv_heads, past + new, hd)
                    _read(values, read),
                    attn_mask=mask,
                    scale=self.scaling,
                    enable_gqa=self.gqa,
                )
                for (start, end), read, mask in zip(batch.spans, batch.reads, masks, strict=True)
            ],
            dim=2,
        )  # (1, heads, T, hd)
        hidden = hidden + F.linear(out.transpose(1, 2).reshape(num_tokens, -1), *self.o)
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

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (T, d); positions: (T,), all < end. cos, sin (T, head_dim): from a table for the
        default (static) rope."""
        rope_type = getattr(self.rotary_emb, "rope_type", "default")
        if rope_type != "default" or end > 8192:
            cos, sin = self.rotary_emb(hidden, positions[None])
            return cos[0], sin[0]
        if self._rope_table is None or self._rope_table[0].shape[0] < end:
            size = min(8192, max(2 * end, 1024, self.config.max_position_embeddings))
            cos, sin = self.rotary_emb(hidden, torch.arange(size, device=hidden.device)[None])
            self._rope_table = cos[0], sin[0]
        cos, sin = self._rope_table
        return cos[positions], sin[positions]

    def new_pool(self, kv_tokens: int | None = None, max_sessions: int = 256, block_size: int = 16) -> KVPool:
        """A pool of `kv_tokens` positions (default: a full context for each of `max_sessions`)."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVPool(
            len(self.layers),
            cfg.num_key_value_heads,
            head_dim,
            kv_tokens or max_sessions * cfg.max_position_embeddings,
            cfg.max_position_embeddings,
            max_sessions,
            self.embed_tokens.weight.dtype,
            self.embed_tokens.weight.device,
            block_size,
        )

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache of its own (a pool of one block) for `capacity` positions, default the model's context."""
        capacity = capacity or self.config.max_position_embeddings
        return self.new_pool(capacity, max_sessions=1, block_size=capacity).open("cache", capacity)

    def forward(self, input_ids: list[int], cache: KVCache, logits_from: int = 0) -> torch.Tensor:
        """Feeds `input_ids` at positions cache.length.. and returns logits (len - logits_from, vocab)."""
        return self.forward_batch([Row(input_ids, cache, logits_from)])[0]

    @torch.inference_mode()
    def forward_batch(self, rows: list[Row]) -> list[torch.Tensor]:
        """One pass over the rows' new tokens, packed; returns each row's logits
        (len(input_ids) - logits_from, vocab). Only positions >= logits_from go through norm and head."""
        for row in rows:
            row.cache.begin(len(row.input_ids))
        batch = pack(rows)
        device = self.embed_tokens.weight.device
        ids = torch.tensor([t for row in rows for t in row.input_ids], device=device)  # (T,)
        hidden = self.embed_tokens(ids)  # (T, d)
        masks = {
            window: [
                causal_mask(end - start, past, window, device)
                for (start, end), past in zip(batch.spans, batch.pasts, strict=True)
            ]
            for window in set(self._windows)
        }
        if self.lean:
            cos, sin = self._rope(hidden, batch.positions, batch.longest)  # (T, head_dim): broadcast over heads
            for layer, window in zip(self._lean_layers, self._windows, strict=True):
                hidden = layer(hidden, cos, sin, batch, masks[window])
        else:
            hidden = _cat(
                [
                    self._module_row(hidden[None, start:end], batch.positions[None, start:end], row.cache, masks, i)
                    for i, (row, (start, end)) in enumerate(zip(rows, batch.spans, strict=True))
                ],
                0,
            )
        for row in rows:
            row.cache.commit()
        kept = [(start + row.logits_from, end) for row, (start, end) in zip(rows, batch.spans, strict=True)]
        logits = self.lm_head(self.norm(_cat([hidden[start:end] for start, end in kept], 0)))  # (kept, vocab)
        return list(logits.split([end - start for start, end in kept]))

    def _module_row(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        masks: dict[int | None, list[torch.Tensor | None]],
        row: int,
    ) -> torch.Tensor:
        """hidden: (1, new, d), positions: (1, new) of one row. Runs it through the transformers layer
        modules, which take one sequence and its cache (via KVCache.update) at a time; returns (new, d)."""
        position_embeddings = self.rotary_emb(hidden, positions)
        for layer, window in zip(self.layers, self._windows, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[window][row],
                position_ids=positions,
                **{self._cache_kwarg: cache},
                position_embeddings=position_embeddings,
            )
        return hidden[0]


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
