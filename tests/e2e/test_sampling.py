"""Seeded sampling through the stack: repeats exactly, differs with another seed, and equals the in-process
engine for the same seed (every round's randomness derives from (seed, round), whichever node runs it)."""

import functools

import pytest
from eesd_client import EesdClient

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.verifier import Verifier
from tests.e2e.conftest import MAIN_EXIT_LAYER

PROMPT = [3, 4, 5, 6]
MAX_NEW = 40
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95)


@functools.cache
def engine(model_dir) -> SpeculativeEngine:
    return SpeculativeEngine(Drafter(model_dir, MAIN_EXIT_LAYER), Verifier(model_dir))


def sample(client: EesdClient, seed: int, policy: str = "beta-ts", k_max: int = 5) -> tuple[int, ...]:
    result = client.generate_text(
        PROMPT, max_new_tokens=MAX_NEW, seed=seed, policy=policy, k_max=k_max, stop_on_eos=False, **SAMPLING
    )
    assert len(result.token_ids) == MAX_NEW
    return result.token_ids


def test_same_seed_repeats_and_another_seed_differs(main_stack):
    with EesdClient(main_stack.controller_address, timeout=120) as client:
        first = sample(client, 1234)
        assert sample(client, 1234) == first
        assert sample(client, 99) != first


@pytest.mark.parametrize("policy", ["beta-ts", "calibration-ts", "fixed", "off"])
def test_equals_the_in_process_engine(main_stack, main_model, policy):
    params = GenerationParams(
        MAX_NEW, SamplingParams(seed=7, **SAMPLING), PolicyParams(policy, k_max=5), stop_on_eos=False
    )
    expected = engine(main_model).generate(PROMPT, params)
    with EesdClient(main_stack.controller_address, timeout=120) as client:
        got = sample(client, 7, policy)
    assert list(got) == list(expected.token_ids)
    if policy != "off":
        assert expected.stats.drafted > 0
