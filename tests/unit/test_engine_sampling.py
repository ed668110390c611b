"""Sampling through the engine: seeded runs repeat; speculation leaves the distribution unchanged."""

import torch
from scipy.stats import chisquare

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.sampling import target_probs
from eesd.tiny import save_tiny_model
from eesd.verifier import Verifier
from tests.conftest import DEVICE


def test_seeded_sampling_repeats_exactly(tiny_models):
    model_dir = tiny_models["qwen2"]
    engine = SpeculativeEngine(Drafter(model_dir, 1, device=DEVICE), Verifier(model_dir, device=DEVICE))
    params = GenerationParams(30, SamplingParams(0.9, top_k=50, top_p=0.95, seed=1234), PolicyParams("beta-ts"))
    first, second = engine.generate([3, 4, 5], params), engine.generate([3, 4, 5], params)
    assert first.token_ids == second.token_ids and first.seed == 1234
    other = engine.generate([3, 4, 5], GenerationParams(30, SamplingParams(0.9, 50, 0.95, seed=99)))
    assert other.token_ids != first.token_ids


def test_speculative_sampling_keeps_the_model_distribution(tmp_path):
    """The second generated token is drawn after a first round in which the untrained drafter
    (N=1, far from the model) proposed it; its frequency must match p given the first token."""
    model_dir = save_tiny_model(tmp_path / "m", "llama", seed=3, vocab_size=12, initializer_range=0.6)
    verifier = Verifier(model_dir, device=DEVICE)
    engine = SpeculativeEngine(Drafter(model_dir, 1, device=DEVICE), verifier)
    prompt, trials = [4, 7], 1500
    params = lambda seed: GenerationParams(2, SamplingParams(1.0, seed=seed), PolicyParams("fixed", k_max=1))  # noqa: E731
    counts = torch.zeros(12)
    for seed in range(trials):
        counts[engine.generate(prompt, params(seed)).token_ids[0]] += 1
    cache = verifier.stack.new_cache()
    p = target_probs(verifier.stack(prompt, cache)[-1], SamplingParams(1.0)).cpu()
    _, p_value = chisquare(counts.numpy(), (p * trials).numpy())
    assert p_value > 1e-3, (counts.tolist(), (p * trials).tolist())
    assert engine.generate(prompt, params(0)).stats.drafted == 1  # the first token really was drafted
