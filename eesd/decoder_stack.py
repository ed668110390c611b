"""A lean forward path over a subset of a model's decoder layers and a position-pointer KV cache.

The drafter's stack is embeddings -> layers 0..N-1 -> exit layer -> norm -> head; the verifier's is the
whole model. Both hold the transformers layer modules (their weights and state dicts are the model's
own) but skip `generate()` and the per-call mask and cache machinery.

Decoding a few tokens at a time on a CPU is bound by per-op Python overhead, not by arithmetic, so
`LeanLayer` runs a Llama-family decoder layer op for op as transformers does (same RMSNorm and rotary
arithmetic) without its wrappers: q/k/v and gate/up are each one matmul over weights stored contiguously
(the modules' parameters become views of the fused tensors, so nothing is duplicated), and cos/sin come
from a table computed once. `lean=False` runs the transformers modules instead.

A pass serves several sessions at once (`forward_batch`), each with its own new tokens and cache
length. Their tokens are packed into one (T, d) batch: embeddings, norms, q/k/v, o, MLP and head are
one matmul over all T tokens. Attention depends on the row's length:

- Short rows (at most SHORT_ROW new tokens: decode and draft steps, verify blocks) attend together in
  one padded batch (`padded_attention`): their caches gathered from the pool into (B, kv_heads, longest,
  head_dim), two batched matmuls and one softmax in fp32 (in several groups, rows of similar length
  together, when one would gather more than PADDED_POSITIONS key positions). SDPA's CPU kernel costs
  ~40-50 us per call on a one-row problem this small whatever its arithmetic, and called once per row
  it made attention most of a batched decode pass.
- Long rows (prefills) attend alone through SDPA over their cache in place, as transformers does
  (bit for bit): its flash kernel never materialises a (new x context) score matrix.

A row's logits do not depend on the other rows of its pass beyond fp32 rounding (tests/unit/
test_batched_forward.py; in bf16 they are the same bits here). Padded against per-row SDPA, milliseconds
per pass of the reference model's shape (16 layers of 256, bf16, 1 thread, context 150; `python -m
bench.profile --rows 1,4,16`, two interleaved runs each; before: 19da6c9 under the same script):

    sessions per pass      1              4              16
                       before  now    before  now    before  now
    verify, 1 token     5.35   5.07    9.52   6.89   23.36  13.55
    verify, 6 tokens    6.05   6.49   10.82   9.81   28.49  23.20
    draft step          0.95   0.80    1.68   1.24    4.47   2.47

A GPU varlen or paged attention kernel can replace both. `lean=False` runs the rows one at a time through
the transformers modules, which take one sequence and one cache object per call.
"""

import inspect
import math
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


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether a query at query_pos may attend to a key at key_pos (broadcast against each other): causal,
    and within the sliding window if there is one."""
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


def causal_mask(num_new: int, past: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(1, 1, num_new, past + num_new) bool mask, True where attention is allowed; None when all is allowed."""
    if num_new == 1 and (window is None or past < window):
        return None
    query_pos = torch.arange(past, past + num_new, device=device)[:, None]
    return visible(query_pos, torch.arange(past + num_new, device=device)[None, :], window)[None, None]


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


class Scratch:
    """Memory a stack reuses from pass to pass for the gathered keys and values. On a CPU a fresh tensor of
    a few MB per layer costs more than the gather that fills it: glibc maps it and unmaps it on free, and
    every page faults again (a 16-row decode pass of the reference model took 47 ms instead of 13). Each
    buffer grows to the largest group so far (PADDED_POSITIONS key positions, or one row's whole context)
    and stays."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def pair(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tensors of `shape` (for keys and values), valid until the next call with this name."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < 2 * numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(2 * numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape), buffer[numel : 2 * numel].view(shape)


# Rows of at most this many new tokens (decode steps, verify blocks) attend together in one padded batch
# with their scores materialized; longer rows (prefills) attend alone through SDPA, whose flash kernel
# never holds a (new x context) score matrix.
SHORT_ROW = 16
# Key positions (rows x the longest row's context) one padded group gathers at most; more short rows than
# that attend in several groups, rows of similar length together. It bounds the scratch memory (fp32 keys
# and values of one group: 8192 x kv_heads x head_dim x 12 bytes, 25 MB for the reference model) whatever
# max_batch and the context are; the reference model's passes of up to 32 sessions fit in one group.
PADDED_POSITIONS = 8192


@dataclass(frozen=True)
class Gather:
    """Where a padded group's keys and values lie in the pool, and the scratch they are gathered into."""

    index: torch.Tensor  # (B * kv_heads * L,) rows of a layer's (kv_heads * pool, hd) view
    into: tuple[torch.Tensor, torch.Tensor]  # (B * kv_heads, L, hd) each, for keys and values


@dataclass
class PaddedRows:
    """A group of a pass's short rows as one padded attention batch: B rows of at most Q new tokens over at
    most L key positions. Padding repeats a row's own real entries (its last query, its first key), so
    nothing uninitialised in the pool is ever read, and the masks keep it out of every result. The
    common cases skip work: None for `queries`, `outputs` and `tokens` when the group is the whole pass and
    equally wide, a slice for `keys` when a lone row's cache lies in consecutive slots (read in place)."""

    queries: torch.Tensor | None  # (B * Q,) each padded query's token in the packed batch
    outputs: torch.Tensor | None  # (T_short,) each of the rows' tokens' place among the padded queries
    tokens: torch.Tensor | None  # (T_short,) the same tokens' places in the packed batch
    keys: slice | Gather  # a lone row's consecutive slots (L of them), or the group's gather
    masks: dict[int | None, torch.Tensor | None]  # per attention window: (B, 1, 1, Q, L) additive, 0 or -inf
    shape: tuple[int, int, int]  # B, Q, L
    upcast: tuple[torch.Tensor, torch.Tensor] | None  # (B * kv_heads, L, hd) each in fp32 (None: fp32 pool)


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
    groups: list[PaddedRows]  # the short rows, in padded groups
    long_rows: list[int]  # the other rows, each attending alone (every row on the module path)


def pack(rows: list[Row], windows: set[int | None], scratch: Scratch | None) -> PackedPass:
    """The layout of a pass over `rows`, which must be distinct sessions of one pool, for layers with the
    given attention windows. Without `scratch` every row attends alone (the module path)."""
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
    ends = [past + end - start for past, (start, end) in zip(pasts, spans, strict=True)]
    device = pool.keys.device
    positions_t = torch.tensor(positions, device=device)
    short = [i for i, (start, end) in enumerate(spans) if end - start <= SHORT_ROW] if scratch else []
    groups = _group(short, ends)
    lengths = [max(ends[i] for i in group) for group in groups]
    if groups:  # sized for the largest group first, so that one buffer serves them all
        kv_row = pool.keys.shape[1] * pool.keys.shape[-1]  # kv_heads * head_dim
        numel = max(len(group) * length for group, length in zip(groups, lengths, strict=True)) * kv_row
        scratch.pair("gathered", (numel,), pool.keys.dtype, device)
        if pool.keys.dtype != torch.float32:
            scratch.pair("upcast", (numel,), torch.float32, device)
    padded = [
        _pad([(spans[i], ends[i], caches[i]) for i in group], length, offset, pool, windows, scratch)
        for group, length in zip(groups, lengths, strict=True)
    ]
    long_rows = [i for i in range(len(rows)) if i not in set(short)]
    return PackedPass(pool, spans, pasts, reads, positions_t, _cat(slots, 0), max(ends), padded, long_rows)


def _group(short: list[int], ends: list[int]) -> list[list[int]]:
    """The short rows (indices into `ends`, each row's past + new) in groups of at most PADDED_POSITIONS
    padded key positions each (a longer row alone): all of them in pass order when they fit, else by
    length, so that a group pads little."""
    if not short or len(short) * max(ends[i] for i in short) <= PADDED_POSITIONS:
        return [short] if short else []
    groups: list[list[int]] = []
    for i in sorted(short, key=ends.__getitem__):
        if groups and (len(groups[-1]) + 1) * ends[i] <= PADDED_POSITIONS:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _pad(
    rows: list[tuple[tuple[int, int], int, KVCache]],
    length: int,
    num_tokens: int,
    pool: KVPool,
    windows: set[int | None],
    scratch: Scratch,
) -> PaddedRows:
    """rows: (span in the packed batch, past + new, cache) of each short row; length: the longest past +
    new among them; num_tokens: T of the whole pass. Builds only what the pass needs (it runs before every
    draft step): most passes are one row, or rows of one width that are the whole pass."""
    device = pool.keys.device
    spans = [span for span, _, _ in rows]
    widths = [end - start for start, end in spans]
    ends = [end for _, end, _ in rows]
    num_rows, width = len(rows), max(widths)
    as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    queries = outputs = tokens = None
    if sum(widths) != num_tokens or min(widths) != width:  # queries padded, or long rows in the pass
        queries = as_tensor(
            [start + min(i, n - 1) for (start, _), n in zip(spans, widths, strict=True) for i in range(width)]
        )
        outputs = as_tensor([b * width + i for b, n in enumerate(widths) for i in range(n)])
        tokens = as_tensor([t for start, end in spans for t in range(start, end)])
    shape = (num_rows * pool.keys.shape[1], length, pool.keys.shape[-1])  # (B * kv_heads, L, hd)
    lone = rows[0][2].slots(0, length) if num_rows == 1 else None
    keys: slice | Gather
    if isinstance(lone, slice):
        keys = lone
    else:
        tables = [cache.table[:end] for (_, _, cache), end in zip(rows, ends, strict=True)]
        index = _flat_slots(torch.stack([torch.cat([t, t[:1].expand(length - len(t))]) for t in tables]), pool)
        keys = Gather(index, scratch.pair("gathered", shape, pool.keys.dtype, device))
    upcast = None if pool.keys.dtype == torch.float32 else scratch.pair("upcast", shape, torch.float32, device)
    masks = {window: _bias(widths, ends, width, length, window, device) for window in windows}
    return PaddedRows(queries, outputs, tokens, keys, masks, (num_rows, width, length), upcast)


def _bias(
    widths: list[int], ends: list[int], width: int, length: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """(B, 1, 1, Q, L) additive mask of the padded rows (B of them, `widths` new tokens each, ending at
    positions `ends`): causal, within the window, nothing past a row's end; None when nothing is masked
    (rows of one new token, all as long, within the window). A padded query sees what its row's last
    query sees."""
    if width == 1 and min(ends) == length and (window is None or length <= window):
        return None
    widths_t, ends_t = torch.tensor(widths, device=device), torch.tensor(ends, device=device)
    query_index = torch.arange(width, device=device)[None, :].minimum(widths_t[:, None] - 1)  # (B, Q)
    query_pos = (ends_t - widths_t)[:, None, None] + query_index[:, :, None]  # (B, Q, 1)
    key_pos = torch.arange(length, device=device)[None, None, :]  # (1, 1, L)
    allowed = visible(query_pos, key_pos, window)  # keys past a row's end lie beyond its last query too
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))[:, None, None]


def _flat_slots(slots: torch.Tensor, pool: KVPool) -> torch.Tensor:
    """slots: (B, L) pool slots -> (B * kv_heads * L,) rows of a layer's (kv_heads * pool, hd) view, so that
    one index_select gathers the keys already laid out (B, kv_heads, L, hd)."""
    kv_heads, pool_size = pool.keys.shape[1], pool.keys.shape[2]
    heads = torch.arange(kv_heads, device=slots.device)[None, :, None] * pool_size
    return (slots[:, None, :] + heads).flatten()


def padded_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: PaddedRows,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """query: (T, heads, hd) every new token of the pass; keys, values: (kv_heads, pool, hd) one layer's
    pool; bias: (B, 1, 1, Q, L) or None. Returns (T_short, heads * hd): the short rows' attention, in the
    order of rows.tokens.

    Everything runs in fp32 and the result is rounded to the model's dtype once, as accurate as SDPA's CPU
    kernel (tests/unit/test_lean_forward.py); rounding the weights to bf16 before the product with the
    values, as a bf16 matmul would, doubled the worst error. Two batched matmuls replace SDPA's call per
    row, whose fixed cost dominated short rows (49 us per row and layer for one bf16 query on this CPU)."""
    num_rows, width, length = rows.shape
    kv_heads, head_dim = keys.shape[0], keys.shape[-1]
    per_kv = query.shape[1] // kv_heads  # query heads per kv head (GQA)
    q = query if rows.queries is None else query.index_select(0, rows.queries)
    q = q.view(num_rows, width, kv_heads, per_kv, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_rows * kv_heads, per_kv * width, head_dim).to(torch.float32, copy=True).mul_(scale)
    if isinstance(rows.keys, slice):  # one row, its cache in consecutive slots: read in place
        k, v = keys[:, rows.keys], values[:, rows.keys]  # (kv_heads, L, hd), views
    else:
        k, v = rows.keys.into
        torch.index_select(keys.view(-1, head_dim), 0, rows.keys.index, out=k.view(-1, head_dim))
        torch.index_select(values.view(-1, head_dim), 0, rows.keys.index, out=v.view(-1, head_dim))
    if rows.upcast is not None:
        k, v = rows.upcast[0].copy_(k), rows.upcast[1].copy_(v)
    scores = torch.bmm(q, k.transpose(1, 2))  # (B * kv_heads, per_kv * Q, L)
    if bias is not None:
        scores.view(num_rows, kv_heads, per_kv, width, length).add_(bias)
    out = torch.bmm(scores.softmax(-1), v).to(query.dtype)  # (B * kv_heads, per_kv * Q, hd)
    out = out.view(num_rows, kv_heads, per_kv, width, head_dim).permute(0, 3, 1, 2, 4)  # (B, Q, kv, per_kv, hd)
    out = out.reshape(num_rows * width, -1)
    return out if rows.outputs is None else out.index_select(0, rows.outputs)


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
        window: int | None,
        masks: dict[int, torch.Tensor | None],
    ) -> torch.Tensor:
        """hidden: (T, d) new positions of all rows; cos, sin: (T, head_dim); masks: the long rows' own,
        (1, 1, new, past + new) bool or None, by row index."""
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, *self.ln1)
        query, key, value = F.linear(x, *self.qkv).split(self.qkv_split, dim=-1)
        query = query.view(num_tokens, -1, self.head_dim)  # (T, heads, hd)
        key = key.view(num_tokens, -1, self.head_dim).transpose(0, 1)  # (kv_heads, T, hd)
        value = value.view(num_tokens, -1, self.head_dim).transpose(0, 1)
        query = (query * cos[:, None]) + (rotate_half(query) * sin[:, None])
        key = (key * cos) + (rotate_half(key) * sin)
        keys, values = batch.pool.layer_keys[self.slot], batch.pool.layer_values[self.slot]  # (kv_heads, pool, hd)
        keys.index_copy_(1, batch.slots, key)
        values.index_copy_(1, batch.slots, value)
        groups = batch.groups
        if len(groups) == 1 and not batch.long_rows:  # (T, heads * hd): every row in one group, in packed order
            out = padded_attention(query, keys, values, groups[0], groups[0].masks[window], self.scaling)
        else:
            out = hidden.new_empty(num_tokens, query.shape[1] * self.head_dim)
            for group in groups:
                short = padded_attention(query, keys, values, group, group.masks[window], self.scaling)
                out.index_copy_(0, group.tokens, short)
            for i in batch.long_rows:
                start, end = batch.spans[i]
                out[start:end] = (
                    F.scaled_dot_product_attention(
                        query[None, start:end].transpose(1, 2),  # (1, heads, new, hd)
                        _read(keys, batch.reads[i]),  # (1, kv_heads, past + new, hd)
                        _read(values, batch.reads[i]),
                        attn_mask=masks[i],
                        scale=self.scaling,
                        enable_gqa=self.gqa,
                    )[0]
                    .transpose(0, 1)
                    .reshape(end - start, -1)
                )
        hidden = hidden + F.linear(out, *self.o)
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
        self._scratch = Scratch()

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
        windows = set(self._windows)
        batch = pack(rows, windows, self._scratch if self.lean else None)
        device = self.embed_tokens.weight.device
        ids = torch.tensor([t for row in rows for t in row.input_ids], device=device)  # (T,)
        hidden = self.embed_tokens(ids)  # (T, d)
        masks = {  # of the rows that attend alone: the long rows, or every row on the module path
            window: {
                i: causal_mask(batch.spans[i][1] - batch.spans[i][0], batch.pasts[i], window, device)
                for i in batch.long_rows
            }
            for window in windows
        }
        if self.lean:
            cos, sin = self._rope(hidden, batch.positions, batch.longest)  # (T, head_dim): broadcast over heads
            for layer, window in zip(self._lean_layers, self._windows, strict=True):
                hidden = layer(hidden, cos, sin, batch, window, masks[window])
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
        masks: dict[int | None, dict[int, torch.Tensor | None]],
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
