"""The target distribution p is built exactly as transformers' sampling builds it."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from eesd.params import SamplingParams
from eesd.sampling import round_seed, target_probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.8), (1.0, 3, 0.5)],
)
def test_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature)]
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    )
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone()).softmax(-1)
    got = target_probs(logits, SamplingParams(temperature, top_k, top_p))
    torch.testing.assert_close(got, expected)


def test_round_seeds_differ_by_round_and_stream_and_repeat():
    assert round_seed(1, 0, "draft") == round_seed(1, 0, "draft")
    assert len({round_seed(1, r, s) for r in range(50) for s in ("draft", "verify", "policy")}) == 150
