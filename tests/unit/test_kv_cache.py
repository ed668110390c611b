"""Rollback: after any accept count the caches equal a fresh prefill of the committed tokens."""

import pytest
import torch

from eesd.drafter import Drafter
from eesd.errors import RollbackError
from eesd.kv_cache import CacheBehind, KVPool
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
