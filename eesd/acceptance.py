"""Lossless acceptance rules (docs/architecture.md §6): which drafts the verifier keeps and which token it adds.

Greedy keeps the longest prefix equal to the target's argmax. Sampling is the rule of Leviathan et al.
and Chen et al. (2023): keep d_i with probability min(1, p_i(d_i) / q_i(d_i)), at the first rejection
sample from norm(max(0, p_i - q_i)), after k acceptances sample the bonus from p_{k+1}. The output is
then distributed exactly as sampling from p, for any q the verifier knows exactly.
"""

from dataclasses import dataclass

import torch

from eesd.sampling import sample


@dataclass(frozen=True)
class AcceptanceResult:
    accepted: int  # how many drafts were kept
    next_token: int  # recovered token (accepted < k) or bonus token (accepted == k)


def accepted_prefix(keep: torch.Tensor) -> int:
    """keep: (k,) bool -> length of the all-True prefix."""
    return int(keep.int().cumprod(dim=0).sum())


def accept_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> AcceptanceResult:
    """target_logits: (k+1, vocab); draft: (k,) token ids."""
    target = target_logits.argmax(dim=-1)  # (k+1,)
    accepted = accepted_prefix(target[: draft.shape[0]] == draft)
    return AcceptanceResult(accepted, int(target[accepted]))


def accept_stochastic(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: torch.Generator
) -> AcceptanceResult:
    """p: (k+1, vocab) target probs; q: (k, vocab) draft probs; draft: (k,) token ids; all on one device.
    `generator` draws on the CPU (eesd.sampling.round_generator) wherever p lies."""
    k = draft.shape[0]
    rows = torch.arange(k, device=p.device)
    p_draft, q_draft = p[rows, draft], q[rows, draft]  # (k,)
    u = torch.rand(k, generator=generator, device=generator.device).to(p.device)
    accepted = accepted_prefix(u * q_draft < p_draft)  # u < p/q without dividing by a zero q
    if accepted == k:
        return AcceptanceResult(k, sample(p[k], generator))
    residual = (p[accepted] - q[accepted]).clamp_min(0)
    # A rejection has probability sum(max(0, q - p)) = sum(residual); it is 0 only when p == q on the support.
    return AcceptanceResult(accepted, sample(residual / residual.sum(), generator))
