"""The acceptance rules on hand-built distributions, including a statistical test of losslessness."""

import pytest
import torch
from scipy.stats import chisquare

from eesd.acceptance import accept_greedy, accept_stochastic, accepted_prefix
from eesd.params import SamplingParams
from eesd.rounds import DraftBlock, VerifyRequest
from eesd.sampling import densify, sparse_top
from eesd.verifier import Verifier


def one_hot_logits(ids: list[int], vocab: int = 8) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float() * 5


@pytest.mark.parametrize(
    ("target", "draft", "accepted", "next_token"),
    [
        ([1, 2, 3, 4], [1, 2, 3], 3, 4),  # all accepted: bonus
        ([1, 2, 3, 4], [1, 5, 3], 1, 2),  # recovered at the first mismatch, later match ignored
        ([1, 2, 3, 4], [7, 2, 3], 0, 1),
        ([6], [], 0, 6),  # no drafts: plain decoding step
    ],
)
def test_greedy_keeps_longest_matching_prefix(target, draft, accepted, next_token):
    result = accept_greedy(one_hot_logits(target), torch.tensor(draft, dtype=torch.long))
    assert (result.accepted, result.next_token) == (accepted, next_token)


def test_accepted_prefix_stops_at_first_false():
    assert accepted_prefix(torch.tensor([True, True, False, True])) == 2
    assert accepted_prefix(torch.tensor([], dtype=torch.bool)) == 0


def _first_token_frequencies(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> torch.Tensor:
    """Draft one token from q, verify against p, count the committed first token."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1])
    for _ in range(trials):
        draft = torch.multinomial(q[0], 1, generator=generator)
        result = accept_stochastic(p, q, draft, generator)
        counts[int(draft) if result.accepted else result.next_token] += 1
    return counts


P = torch.tensor([[0.05, 0.4, 0.1, 0.2, 0.0, 0.25], [0.3, 0.1, 0.1, 0.2, 0.2, 0.1]])
QS = {
    "close": torch.tensor([[0.1, 0.35, 0.1, 0.2, 0.0, 0.25]]),
    "far": torch.tensor([[0.7, 0.0, 0.0, 0.0, 0.3, 0.0]]),  # mass on a token p forbids
    "sparse": densify([[1, 3]], [[0.6, 0.4]], 6),  # a top-2 wire q
    "equal": P[:1].clone(),
}


@pytest.mark.parametrize("q_name", QS)
def test_stochastic_output_follows_target_distribution(q_name):
    trials = 6000
    counts = _first_token_frequencies(P, QS[q_name], trials, seed=11)
    support = P[0] > 0
    assert counts[~support].sum() == 0  # never emits a token p gives zero mass
    _, p_value = chisquare(counts[support].numpy(), (P[0][support] * trials).numpy())
    assert p_value > 1e-3, (q_name, counts.tolist())


def test_bonus_token_follows_next_position_distribution():
    """With q == p every draft is accepted, so the committed second token is the bonus from p_2."""
    generator = torch.Generator().manual_seed(5)
    counts = torch.zeros(6)
    for _ in range(4000):
        draft = torch.multinomial(P[0], 1, generator=generator)
        result = accept_stochastic(P, P[:1], draft, generator)
        assert result.accepted == 1
        counts[result.next_token] += 1
    assert chisquare(counts.numpy(), (P[1] * 4000).numpy()).pvalue > 1e-3


def test_seeded_acceptance_repeats_exactly():
    q = QS["far"]
    runs = [_first_token_frequencies(P, q, 200, seed=3) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_sparse_top_renormalises_and_drops_zeros():
    ids, probs = sparse_top(torch.tensor([0.5, 0.0, 0.3, 0.2]), 3)
    assert ids.tolist() == [0, 2, 3]
    assert probs.sum().item() == pytest.approx(1.0)
    ids, probs = sparse_top(torch.tensor([0.5, 0.0, 0.3, 0.2]), 2)
    assert ids.tolist() == [0, 2] and probs.tolist() == pytest.approx([0.625, 0.375])


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9)])
def test_the_verifier_keeps_acceptance_on_the_models_device(tiny_models, sampling):
    """The meta device stands in for a GPU (as in test_batched_forward.py): the verify pass and the rule run
    up to their first read of a number on the host, which meta cannot give; a CPU tensor mixed in on the way
    (the draft tokens, q, the uniforms) would fail earlier, with a device error."""
    verifier = Verifier(tiny_models["llama"], device="meta")
    q = ([[3, 4], [4, 9]], [[0.5, 0.5], [0.75, 0.25]]) if not sampling.greedy else (None, None)
    draft = DraftBlock([3, 4], [0.5, 0.75], *q)
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        verifier.verify(VerifyRequest("s", 0, 0, [5, 6], draft, seed=1, sampling=sampling))
