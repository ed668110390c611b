"""A batched pass gives every session the logits and cache it gets alone; the KV pool admits, refuses and
reuses space by reservation, and no pass writes outside its sessions' positions."""

import pytest
import torch

from eesd import decoder_stack
from eesd.checkpoint import CheckpointReader, load_config
from eesd.decoder_stack import SHORT_ROW, DecoderStack, Row, Scratch, build_stack, pack
from eesd.errors import ResourceExhausted
from eesd.kv_cache import KVCache, KVPool

ARCHS = ["llama", "qwen2", "mistral"]  # plain, GQA with q/k/v biases, sliding window of 48
# fp32 rounding: a matmul over T packed rows rounds differently from one over a row's own tokens. The
# differences (up to 1.6e-5 measured, on logits of magnitude up to 8) are no larger than those of either
# pass from a float64 pass (up to 4e-5); a wrong position, mask or cache row is off by orders more.
EXACT = dict(rtol=0, atol=5e-5)


def tokens(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 11 * salt + 3) % 380 + 3 for i in range(n)]


def load(model_dir, lean: bool = True, device: str = "cpu") -> DecoderStack:
    config, reader = load_config(model_dir), CheckpointReader.open(model_dir)
    return build_stack(config, reader, list(range(config.num_hidden_layers)), torch.float32, device, lean=lean)


def opened(stack: DecoderStack, pool: KVPool, session_id: str, context: int, reserve: int | None = None) -> KVCache:
    """A session of `pool` holding `context` tokens."""
    cache = pool.open(session_id, reserve)
    if context:
        stack(tokens(context, salt=len(session_id)), cache)
    return cache


def cached(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The session's valid keys and values, (layers, kv_heads, length, head_dim) each."""
    valid = cache.slots(0, cache.length)
    return cache.pool.keys[:, :, valid], cache.pool.values[:, :, valid]


def check_batch_equals_alone(
    stack: DecoderStack, steps: list[tuple[str, list[int], int]], batched: dict[str, KVCache], alone: dict[str, KVCache]
) -> None:
    """Feeds each (session, new tokens, logits_from) in one pass of `batched` and one at a time in `alone`."""
    out = stack.forward_batch([Row(new, batched[name], logits_from) for name, new, logits_from in steps])
    for (name, new, logits_from), logits in zip(steps, out, strict=True):
        torch.testing.assert_close(logits, stack(new, alone[name], logits_from), **EXACT)
        assert batched[name].length == alone[name].length
        for mine, expected in zip(cached(batched[name]), cached(alone[name]), strict=True):
            torch.testing.assert_close(mine, expected, **EXACT)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_logits_equal_each_session_alone(tiny_models, arch, lean):
    stack = load(tiny_models[arch], lean)
    assert stack.lean == lean
    check_two_ragged_passes(stack)


@pytest.mark.parametrize("arch", ARCHS)
def test_short_rows_past_the_group_budget_attend_in_groups(tiny_models, arch, monkeypatch):
    # 4 short rows of up to 206 positions exceed 256: by length, the three shortest share a group.
    monkeypatch.setattr(decoder_stack, "PADDED_POSITIONS", 256)
    stack = load(tiny_models[arch])
    pool = stack.new_pool(max_sessions=4)
    rows = [
        Row([1] * new, opened(stack, pool, f"s{i}", past))
        for i, (past, new) in enumerate([(200, 6), (60, 1), (1, 3), (0, 5)])
    ]
    assert [group.shape[0] for group in pack(rows, {None}, Scratch()).groups] == [3, 1]
    check_two_ragged_passes(stack)


def check_two_ragged_passes(stack: DecoderStack) -> None:
    """Sessions at different cache lengths, fed different numbers of tokens in one pass, rolled back by
    different amounts and fed again: every session's logits and cache equal its own alone."""
    contexts = {"fresh": 0, "deep": 200, "decode": 60, "short": 1}  # deep is past mistral's window
    batched_pool, alone_pool = stack.new_pool(max_sessions=4), stack.new_pool(max_sessions=4)
    batched = {name: opened(stack, batched_pool, name, n) for name, n in contexts.items()}
    alone = {name: opened(stack, alone_pool, name, n) for name, n in contexts.items()}
    first = [
        ("fresh", tokens(SHORT_ROW + 4), 0),  # a prompt from base 0, long: it attends alone, the others padded
        ("deep", tokens(6, salt=1), 0),  # a verify block deep in the context
        ("decode", [17], 0),
        ("short", tokens(3, salt=2), 2),  # a prefill that wants its last logits only
    ]
    check_batch_equals_alone(stack, first, batched, alone)
    # Roll back (rejected drafts) by different amounts, then continue with different counts.
    for name, length in {"fresh": 2, "deep": 203, "short": 4}.items():
        batched[name].crop(length)
        alone[name].crop(length)
    second = [("deep", [9], 0), ("fresh", tokens(4, salt=3), 1), ("decode", tokens(2, salt=4), 0), ("short", [5], 0)]
    check_batch_equals_alone(stack, second, batched, alone)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_session_on_scattered_blocks_equals_one_on_consecutive_blocks(tiny_models, arch, lean):
    stack = load(tiny_models[arch], lean)
    pool = stack.new_pool(kv_tokens=4 * 16, max_sessions=4, block_size=16)
    sessions = {name: pool.open(name, 16) for name in "abcd"}
    pool.close("a")
    pool.close("c")
    scattered = pool.open("e", 32)  # blocks 0 and 2: its reads are gathers
    assert isinstance(scattered.slots(0, 1), torch.Tensor)
    batched = {"b": sessions["b"], "e": scattered}
    alone = {"b": stack.new_cache(), "e": stack.new_cache()}
    for name, context in (("b", 10), ("e", 14)):
        for cache in (batched[name], alone[name]):
            stack(tokens(context), cache)
    # e's new positions 14..19 cross from its first block into its second.
    check_batch_equals_alone(stack, [("e", tokens(6, salt=5), 0), ("b", [4, 5], 0)], batched, alone)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_pass_keeps_every_tensor_on_the_models_device(tiny_models, arch, lean):
    """The meta device stands in for a GPU, which CI lacks: a tensor that a pass makes on the CPU (positions,
    slots, masks, the rope table, a gather index) and mixes with the model's fails here as it would on
    CUDA. The passes hold long and padded short rows, a session on scattered blocks, rollback, and context
    past mistral's window."""
    stack = load(tiny_models[arch], lean, device="meta")
    pool = stack.new_pool(kv_tokens=8 * 16, max_sessions=4, block_size=16)
    sessions = {"deep": pool.open("deep", 80), **{name: pool.open(name, 16) for name in ("x", "short", "z")}}
    pool.close("x")
    pool.close("z")
    sessions["scattered"] = pool.open("scattered", 32)  # blocks 5 and 7
    assert isinstance(sessions["scattered"].slots(0, 1), torch.Tensor)
    passes = [
        [("deep", tokens(70)), ("scattered", tokens(10)), ("short", tokens(3))],
        [("deep", tokens(6, salt=1)), ("scattered", tokens(8, salt=2)), ("short", [7])],
        [("deep", [9]), ("short", [5])],
    ]
    for i, rows in enumerate(passes):
        out = stack.forward_batch([Row(new, sessions[name]) for name, new in rows])
        assert [(logits.device.type, len(logits)) for logits in out] == [("meta", len(new)) for _, new in rows]
        if i == 1:
            sessions["deep"].crop(72)  # its verify block: two of six drafts kept


@pytest.mark.parametrize("lean", [True, False])
def test_batched_pass_leaves_other_sessions_positions_alone(tiny_models, lean):
    stack = load(tiny_models["qwen2"], lean)
    pool = stack.new_pool(kv_tokens=4 * 16, max_sessions=3, block_size=16)
    # Blocks 0 | 1 | 2-3: the neighbour sits between two sessions of the pass.
    before = opened(stack, pool, "before", 10, reserve=16)
    neighbour = opened(stack, pool, "neighbour", 16, reserve=16)  # fills its reservation
    after = pool.open("after", 32)
    snapshot = [t.clone() for t in cached(neighbour)]
    # `before` writes up to the last position it reserved, `after` from its first.
    stack.forward_batch([Row(tokens(6, salt=6), before), Row(tokens(20, salt=7), after)])
    assert before.length == before.capacity == 16
    for now, then in zip(cached(neighbour), snapshot, strict=True):
        assert torch.equal(now, then)


def test_pool_refuses_what_it_cannot_hold_and_reuses_space_after_close():
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=4, kv_tokens=64, max_context=40, max_sessions=2)
    whole = pool.open("whole", 1000)
    assert whole.capacity == 40 and pool.reserved_tokens == 48  # the model's context, in whole blocks of 16
    pool.close("whole")
    assert pool.open("a", 20).capacity == 32 and pool.usage() == 0.5
    with pytest.raises(ResourceExhausted, match="32 of 64 tokens free"):
        pool.open("b", 33)
    pool.open("b", 32)
    assert pool.usage() == 1.0
    with pytest.raises(ResourceExhausted, match="maximum of 2 sessions"):
        pool.open("c", 1)
    pool.close("a")
    assert pool.usage() == 0.5 and len(pool) == 1
    assert pool.open("c", 20).blocks == [0, 1]  # a's space again


def test_session_cannot_outgrow_its_reservation(tiny_models):
    stack = load(tiny_models["llama"])
    pool = stack.new_pool(max_sessions=2)
    cache = opened(stack, pool, "s", 10, reserve=16)
    with pytest.raises(ResourceExhausted, match="reservation of 16"):
        stack(tokens(7), cache)
    assert cache.length == 10
    stack(tokens(6), cache)  # exactly fills it
    assert cache.length == 16


def test_batched_pass_takes_distinct_sessions_of_one_pool(tiny_models):
    stack = load(tiny_models["llama"])
    pool = stack.new_pool(max_sessions=2)
    cache = pool.open("s")
    with pytest.raises(ValueError, match="distinct sessions of one pool"):
        stack.forward_batch([Row([1], cache), Row([2], cache)])
    with pytest.raises(ValueError, match="distinct sessions of one pool"):
        stack.forward_batch([Row([1], cache), Row([2], stack.new_cache())])
