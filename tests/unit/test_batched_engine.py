"""In-process batched generation (SpeculativeEngine.generate_batch): every session of a batch equals the
model's plain greedy output; a seeded sampled session draws the same tokens alone or in any batch; the
KV pools admit only what they can hold, and the rest waits its turn."""

import pytest

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import ResourceExhausted
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.policies import POOLED_WEIGHT
from eesd.verifier import Verifier
from tests.conftest import DEVICE, hf_greedy

ARCHS = ("llama", "qwen2", "mistral")
# Ragged on purpose: a one-token prompt, one past Mistral's window of 48, and others in between.
PROMPTS = [[5], [(7 * i + 3) % 380 + 3 for i in range(70)], [9, 8, 7, 6], [(3 * i) % 300 + 4 for i in range(20)]]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_session_of_a_batch_matches_hf_greedy(tiny_models, arch):
    model_dir = tiny_models[arch]
    verifier, drafter = Verifier(model_dir, device=DEVICE), Drafter(model_dir, 2, device=DEVICE)
    engine = SpeculativeEngine(drafter, verifier, max_batch=3)  # the fourth prompt joins when one finishes
    params = [
        GenerationParams(30, policy=PolicyParams("beta-ts", k_max=5)),
        GenerationParams(12, policy=PolicyParams("fixed", k_max=3)),
        GenerationParams(25, policy=PolicyParams("off")),
        GenerationParams(18, policy=PolicyParams("calibration-ts", k_max=4)),
    ]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    results = engine.generate_batch(PROMPTS, params, lambda i, tokens: streamed[i].extend(tokens))
    for i, (prompt, p, result) in enumerate(zip(PROMPTS, params, results, strict=True)):
        assert result.token_ids == hf_greedy(model_dir, prompt, p.max_new_tokens) == streamed[i], i
    assert len(verifier.sessions) == len(drafter.sessions) == 0  # every session's space was given back


def test_a_seeded_session_draws_the_same_tokens_alone_and_in_any_batch(tiny_models):
    model_dir = tiny_models["llama"]
    engine = SpeculativeEngine(Drafter(model_dir, 2, device=DEVICE), Verifier(model_dir, device=DEVICE))
    seeded = GenerationParams(24, SamplingParams(temperature=0.9, top_k=40, seed=77), PolicyParams("fixed", k_max=3))
    alone = engine.generate(PROMPTS[3], seeded).token_ids
    others = GenerationParams(20, SamplingParams(temperature=1.0, seed=5), PolicyParams("beta-ts", k_max=4))
    for batch in ([PROMPTS[0], PROMPTS[3]], [PROMPTS[3], PROMPTS[1], PROMPTS[2]]):
        params = [seeded if prompt is PROMPTS[3] else others for prompt in batch]
        results = engine.generate_batch(batch, params)
        assert results[batch.index(PROMPTS[3])].token_ids == alone


def test_pools_admit_what_they_can_hold_and_the_rest_waits(tiny_models):
    model_dir = tiny_models["llama"]
    verifier, drafter = Verifier(model_dir, device=DEVICE), Drafter(model_dir, 2, device=DEVICE)
    # Room for two sessions of 64 reserved positions at a time (blocks of 16 positions).
    verifier.sessions = verifier.stack.new_pool(kv_tokens=128)
    drafter.sessions = drafter.stack.new_pool(kv_tokens=128)
    engine = SpeculativeEngine(drafter, verifier)
    prompts = [[4 + i, 5, 6] for i in range(5)]
    params = GenerationParams(40, policy=PolicyParams("fixed", k_max=3))  # 43 positions -> 48 reserved
    results = engine.generate_batch(prompts, params)
    assert [r.token_ids for r in results] == [hf_greedy(model_dir, p, 40) for p in prompts]
    with pytest.raises(ResourceExhausted, match="KV pool"):  # could never fit, even alone
        engine.generate([4, 5, 6], GenerationParams(200, policy=PolicyParams("fixed")))


def test_load_aware_sessions_of_a_lock_step_batch_draft_one_k(tiny_models, monkeypatch):
    """Once the passes are measured, the engine sizes one block for every load-aware session of a round
    (the others keep their own policy's bound) with the batch's pooled verdicts in every draw, and every
    session still equals plain greedy."""
    import eesd.engine

    chosen: list[list[int | None]] = []
    pools: list[tuple[float, float]] = []

    def record(requests, measured_cost, pooled):
        budgets = lock_step_budgets(requests, measured_cost, pooled)
        pools.append(pooled)
        chosen.append([None if r.policy.name == "fixed" else b for r, b in zip(requests, budgets, strict=True)])
        assert all(b is None for r, b in zip(requests, budgets, strict=True) if r.policy.name == "fixed")
        return budgets

    lock_step_budgets = eesd.engine.lock_step_budgets
    monkeypatch.setattr(eesd.engine, "lock_step_budgets", record)
    model_dir = tiny_models["llama"]
    engine = SpeculativeEngine(Drafter(model_dir, 2, device=DEVICE), Verifier(model_dir, device=DEVICE))
    aware = PolicyParams("beta-ts", k_max=6, options={"load_aware": 1.0})
    params = [GenerationParams(30, policy=aware)] * 3 + [GenerationParams(30, policy=PolicyParams("fixed", k_max=2))]
    results = engine.generate_batch(PROMPTS, params)
    assert [r.token_ids for r in results] == [hf_greedy(model_dir, p, 30) for p in PROMPTS]
    sized = [[b for b in budgets if b is not None] for budgets in chosen]
    assert any(sized), "the load was never measured"
    assert all(len(set(budgets)) <= 1 for budgets in sized)
    assert pools[0] == (0.0, 0.0)  # nothing judged yet
    assert sum(pools[-1]) == pytest.approx(POOLED_WEIGHT)  # the rounds' verdicts joined the draws
