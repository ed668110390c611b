"""Greedy equality, the end-to-end oracle: every policy and N reproduces HF generate(do_sample=False)."""

import functools

import pytest

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import POLICY_NAMES, GenerationParams, PolicyParams
from eesd.verifier import Verifier
from tests.conftest import DEVICE, hf_greedy

ARCHS = ("llama", "qwen2", "mistral")
PROMPTS = {"short": [5], "long": [(7 * i + 3) % 380 + 3 for i in range(70)]}  # long > mistral's window of 48
MAX_NEW = 40


@functools.cache
def _verifier(model_dir) -> Verifier:
    return Verifier(model_dir, device=DEVICE)


@functools.cache
def _drafter(model_dir, n: int) -> Drafter:
    return Drafter(model_dir, n, device=DEVICE)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_every_policy_and_exit_layer_matches_hf_greedy(tiny_models, arch, prompt_name):
    model_dir, prompt = tiny_models[arch], PROMPTS[prompt_name]
    expected = hf_greedy(model_dir, prompt, MAX_NEW)
    verifier = _verifier(model_dir)
    num_layers = verifier.config.num_hidden_layers
    for n in sorted({1, num_layers // 2, num_layers - 1}):
        engine = SpeculativeEngine(_drafter(model_dir, n), verifier)
        for policy in POLICY_NAMES:
            result = engine.generate(prompt, GenerationParams(MAX_NEW, policy=PolicyParams(policy, k_max=5)))
            assert result.token_ids == expected, (n, policy)
            assert result.finish_reason == "length"
            assert result.stats.generated == MAX_NEW


@pytest.mark.parametrize("arch", ARCHS)
def test_stops_at_eos_like_hf(tiny_models, arch):
    """EOS is a token the model emits mid-sequence, so generation must stop exactly there, inside a round."""
    model_dir, prompt = tiny_models[arch], PROMPTS["long"]
    free_run = hf_greedy(model_dir, prompt, MAX_NEW)
    eos = free_run[17]
    expected = hf_greedy(model_dir, prompt, MAX_NEW, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) < MAX_NEW
    verifier = _verifier(model_dir)
    for n in (1, verifier.config.num_hidden_layers - 1):
        engine = SpeculativeEngine(_drafter(model_dir, n), verifier, eos_token_ids=frozenset({eos}))
        for policy in ("fixed", "beta-ts", "off"):
            result = engine.generate(prompt, GenerationParams(MAX_NEW, policy=PolicyParams(policy)))
            assert result.token_ids == expected
            assert result.finish_reason == "eos"


def test_full_depth_untrained_exit_layer_accepts_everything(tiny_models):
    """With N = L-1 the untrained exit layer is a copy of the last layer: the drafter is the model."""
    model_dir = tiny_models["llama"]
    verifier = _verifier(model_dir)
    engine = SpeculativeEngine(_drafter(model_dir, verifier.config.num_hidden_layers - 1), verifier)
    result = engine.generate([9, 8, 7], GenerationParams(33, policy=PolicyParams("fixed", k_max=4)))
    assert result.stats.mean_accepted_tokens == pytest.approx(33 / result.stats.rounds)
    assert result.stats.accepted == result.stats.drafted
    assert result.stats.rounds == 7  # 6 rounds of 4 drafts + bonus, then 2 drafts + bonus
