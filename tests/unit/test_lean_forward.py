"""The lean forward path computes what the transformers layer modules compute, on every architecture."""

import copy

import pytest
import torch
import torch.nn.functional as F

from eesd.checkpoint import CheckpointReader, load_config
from eesd.decoder_stack import SHORT_ROW, Row, Scratch, build_stack, pack, padded_attention, resident_bytes
from eesd.kv_cache import KVPool


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_matches_transformers_modules(tiny_models, arch, dtype):
    config, reader = load_config(tiny_models[arch]), CheckpointReader.open(tiny_models[arch])
    layers = list(range(config.num_hidden_layers))
    lean, modules = (build_stack(config, reader, layers, dtype, "cpu", lean=flag) for flag in (True, False))
    assert lean.lean and not modules.lean
    assert resident_bytes(lean) == resident_bytes(modules)  # fused weights are shared, not copied
    truth = copy.deepcopy(modules).double()  # the same weights, in float64
    caches = [stack.new_cache() for stack in (lean, modules, truth)]

    def feed(tokens: list[int]) -> tuple[torch.Tensor, ...]:
        return tuple(stack(tokens, cache).double() for stack, cache in zip((lean, modules, truth), caches, strict=True))

    def check(tokens: list[int]) -> None:
        mine, theirs, exact = feed(tokens)
        if dtype == torch.float32:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
        elif len(tokens) > SHORT_ROW:  # a long row attends through SDPA, as transformers does: bit for bit
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        else:
            # A short row attends in the lean path's own kernel (decoder_stack.padded_attention), whose bf16
            # rounding differs from SDPA's: it must be as close to the float64 result as transformers is.
            # Measured mean errors, lean over transformers, on these models: 0.88-1.32.
            assert (mine - exact).abs().mean() <= 1.5 * (theirs - exact).abs().mean()

    check([(7 * i + 3) % 380 + 3 for i in range(60)])  # a prompt longer than mistral's window of 48
    for step in ([9], [4, 5, 6], [11]):  # decode, a verify block, decode after it
        check(step)
    for cache in caches:
        cache.crop(58)
    check([1, 2])


def test_fused_parameters_still_load_as_the_checkpoint(tiny_models):
    config, reader = load_config(tiny_models["qwen2"]), CheckpointReader.open(tiny_models["qwen2"])
    stack = build_stack(config, reader, [0, 1], torch.float32, "cpu")
    state = stack.layers[1].state_dict()
    expected = reader.read_prefix("model.layers.1.", torch.float32)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def reference_attention(query, keys, values, past: int, window: int | None, scale: float) -> torch.Tensor:
    """query: (new, heads, hd); keys, values: (kv_heads, past + new, hd) of one row. float64, no kernel."""
    new, heads = query.shape[0], query.shape[1]
    per_kv = heads // keys.shape[0]
    k, v = keys.double().repeat_interleave(per_kv, 0), values.double().repeat_interleave(per_kv, 0)
    scores = torch.einsum("qhd,hkd->hqk", query.double(), k) * scale
    query_pos = torch.arange(past, past + new)[:, None]
    key_pos = torch.arange(past + new)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    out = torch.einsum("hqk,hkd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return out.reshape(new, -1)


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_padded_attention_is_as_accurate_as_sdpa(kv_heads, window):
    """Ragged short rows in one padded batch, in bf16: every row's attention is as close to float64 as
    SDPA's kernel on that row alone (rounding scores to bf16 would be about 3x further)."""
    torch.manual_seed(0)
    heads, head_dim, scale = 4, 32, 32**-0.5
    rows = [(0, 1), (40, 1), (100, 5), (7, SHORT_ROW), (63, 3)]  # (past, new)
    pool = KVPool(1, kv_heads, head_dim, kv_tokens=512, max_context=256, dtype=torch.bfloat16)
    pool.keys.normal_(), pool.values.normal_()
    pool_keys, pool_values = pool.layer_keys[0], pool.layer_values[0]
    caches = [pool.open(f"row{i}", past + new) for i, (past, new) in enumerate(rows)]
    for cache, (past, _) in zip(caches, rows, strict=True):
        cache.begin(past)
        cache.commit()
    batch = pack([Row([0] * new, cache) for cache, (_, new) in zip(caches, rows, strict=True)], {window}, Scratch())
    (group,) = batch.groups
    assert not batch.long_rows
    query = torch.randn(sum(new for _, new in rows), heads, head_dim, dtype=torch.bfloat16)
    out = padded_attention(query, pool_keys, pool_values, group, group.masks[window], scale)
    for (past, new), (start, end), read in zip(rows, batch.spans, batch.reads, strict=True):
        keys, values = pool_keys[:, read], pool_values[:, read]
        exact = reference_attention(query[start:end], keys, values, past, window, scale)
        mask = torch.ones(new, past + new, dtype=torch.bool).tril(past)
        if window is not None:
            mask &= ~torch.ones_like(mask).tril(past - window)
        sdpa = F.scaled_dot_product_attention(
            query[None, start:end].transpose(1, 2),  # (1, heads, new, hd)
            keys[None],
            values[None],
            attn_mask=mask[None, None],
            scale=scale,
            enable_gqa=kv_heads != heads,
        )
        sdpa = sdpa[0].transpose(0, 1).reshape(new, -1)
        mine = out[start:end].double()
        assert (mine - exact).abs().max() <= 1.25 * (sdpa.double() - exact).abs().max() + 1e-3
        assert (mine - exact).abs().mean() <= 1.25 * (sdpa.double() - exact).abs().mean()
