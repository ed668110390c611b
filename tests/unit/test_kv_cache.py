"""The KV pool: rollback equals a fresh prefill; sessions are scoped by owner; a full pool evicts LRU idle sessions."""

import time

import pytest
import torch

from eesd.drafter import Drafter
from eesd.errors import InvalidArgument, NotFound, ResourceExhausted, RollbackError
from eesd.kv_cache import CacheBehind, KVPool
from eesd.params import new_owner, session_key
from eesd.verifier import Verifier


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rollback_equals_fresh_prefill(tiny_models, arch):
    verifier = Verifier(tiny_models[arch])
    drafter = Drafter(tiny_models[arch], 2)
    prompt = list(range(10, 40))
    drafts = [50, 51, 52, 53, 54]
    for stack in (verifier.stack, drafter.stack):
        for accepted in range(len(drafts) + 1):
            cache = stack.new_cache()
            stack(prompt, cache)
            stack(drafts, cache)
            cache.crop(len(prompt) + accepted)
            fresh = stack.new_cache()
            stack(prompt + drafts[:accepted], fresh)
            n = fresh.length
            assert cache.length == n
            for name in ("keys", "values"):
                cached, expected = (getattr(c.pool, name)[:, :, c.slots(0, n)] for c in (cache, fresh))
                torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
            # and it keeps decoding as the fresh cache does
            torch.testing.assert_close(stack([7], cache), stack([7], fresh), atol=1e-4, rtol=1e-4)


def test_crop_refuses_lengths_it_does_not_hold():
    cache = KVPool(2, 1, 4, kv_tokens=4, max_context=4, block_size=4).open("s")
    cache.begin(3)
    cache.commit()
    with pytest.raises(RollbackError):
        cache.crop(4)
    with pytest.raises(RollbackError):
        cache.crop(-1)
    cache.crop(1)
    assert cache.length == 1


def test_session_behind_base_is_told_its_length(tiny_models):
    verifier = Verifier(tiny_models["llama"])
    verifier.sessions.open("s")
    with pytest.raises(CacheBehind) as info:
        verifier.sessions.at_base("s", 5, [1])
    assert info.value.cache_length == 0


def test_owner_tokens_scope_sessions():
    """A call that names a session without its owner token names another session: the owned one is never
    touched, and a malformed owner is refused naming the field."""
    pool = KVPool(2, 1, 4, kv_tokens=64, max_context=16, block_size=4)
    owner = new_owner()
    owned = pool.open(session_key("s", owner), 16)
    owned.begin(5)
    owned.commit()
    assert pool.at_base("s", 0, [1]).length == 0  # the unowned "s": a new, empty session
    pool.close("s")
    pool.close(session_key("s", new_owner()))
    assert pool.get(session_key("s", owner)) is owned and owned.length == 5
    with pytest.raises(InvalidArgument) as info:
        pool.open(session_key("s", "short"))
    assert info.value.field == "owner"
    with pytest.raises(NotFound) as missing:
        pool.get(session_key("t", owner))
    assert owner not in str(missing.value)  # the token is the controller's secret


def test_a_full_pool_evicts_the_least_recently_used_idle_session():
    pool = KVPool(2, 1, 4, kv_tokens=48, max_context=48, block_size=4, max_sessions=3)
    pool.evict_idle_s = 0.05
    for key in ("a", "b", "c"):
        pool.open(key, 16)
    with pytest.raises(ResourceExhausted):  # none idle long enough yet
        pool.open("d", 16)
    time.sleep(0.06)
    pool.get("a").begin(1)  # used: "b" is now the least recently used
    pool.in_use = lambda key: key == "c"  # a job of "c" waits: never evicted
    pool.open("d", 16)
    assert sorted(pool) == ["a", "c", "d"] and pool.evicted == 1
    time.sleep(0.06)
    with pytest.raises(ResourceExhausted):  # evicting both idle sessions ("a", "d") frees 32 of the 48 asked
        pool.open("e", 48)
    assert sorted(pool) == ["a", "c", "d"]
