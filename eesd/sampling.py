"""Turning logits into the distribution a request samples from, exactly as plain sampling does.

The order and tie rules follow transformers' temperature -> top-k -> top-p warpers, so that p in the
acceptance rule is the distribution autoregressive sampling would have used.
"""

import hashlib

import torch

from eesd.params import SamplingParams


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: (..., vocab) -> float32 logits with filtered tokens at -inf."""
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: (..., vocab) -> probs (..., vocab), float32, for a sampling (temperature > 0) request."""
    return warp_logits(logits, params).softmax(dim=-1)


def sparse_top(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: (vocab,) -> (ids (K,), probs (K,)): the top-K renormalised; exact q for the wire."""
    top = torch.topk(probs, min(k, probs.shape[-1]))
    keep = top.values > 0
    values = top.values[keep]
    return top.indices[keep], values / values.sum()


def densify(q_ids: list[list[int]], q_probs: list[list[float]], vocab_size: int) -> torch.Tensor:
    """Sparse rows (ids, probs) of the wire format -> dense (rows, vocab) float32 distributions."""
    dense = torch.zeros((len(q_ids), vocab_size), dtype=torch.float32)
    for row, (ids, probs) in enumerate(zip(q_ids, q_probs, strict=True)):
        dense[row, ids] = torch.tensor(probs, dtype=torch.float32)
    return dense


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """probs: (vocab,) on any device -> one token id, drawn where `generator` is (the CPU)."""
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator))


def round_seed(seed: int, round_index: int, stream: str) -> int:
    """Seed of one random stream ('draft', 'verify', 'policy') of one round.

    Deriving every round's randomness from (seed, round) makes a seeded request reproduce exactly
    whether it runs in-process or across services, and survive a node restart mid-session.
    """
    digest = hashlib.blake2b(f"{seed}:{round_index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def round_generator(seed: int, round_index: int, stream: str) -> torch.Generator:
    """The round's stream as a CPU generator, whatever device the model runs on: CUDA and CPU generators
    draw different numbers from one seed, so a seeded request samples the same on either (given the same
    logits); a round moves only its few uniforms to the device and one row of probabilities to the host."""
    return torch.Generator().manual_seed(round_seed(seed, round_index, stream))
