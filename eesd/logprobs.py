"""Log probabilities of committed tokens, from the verifier's own pass (docs/architecture.md §6.1).

Which distribution: the target distribution p the committed tokens are distributed as, the one the
acceptance rule keeps the output equal to (eesd/acceptance.py). Under sampling that is the model's
softmax after the request's temperature, top-k and top-p (`eesd.sampling.warp_logits`, vLLM's
`processed_logprobs`); a token they filter out has p = 0 and is never committed, and is left out of the
top entries. Under greedy decoding (temperature 0, where top-k and top-p do not apply) there is no
sampling distribution: p is the model's raw softmax. Never the drafter's q: drafts only change speed,
and an accepted draft gets the log p of the verifier's row that judged it, so the values do not depend
on speculation, k or batching beyond floating-point rounding.
"""

import torch

from eesd.params import SamplingParams
from eesd.rounds import TokenLogprob
from eesd.sampling import warp_logits


def log_target(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: (..., vocab) -> log p (..., vocab), float32, -inf where p = 0."""
    scores = logits.float() if params.greedy else warp_logits(logits, params)
    return scores.log_softmax(dim=-1)


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], params: SamplingParams, top: int
) -> tuple[TokenLogprob, ...]:
    """Row i of `logits` (one row per token, (n, vocab)) is the model's at the position that committed
    `tokens[i]`: each token's log p, and the `top` most likely entries of p there, most likely first."""
    logp = log_target(logits[: len(tokens)], params)
    chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return tuple(TokenLogprob(t, lp) for t, lp in zip(tokens, chosen, strict=True))
    values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    out = []
    for token, lp, row_values, row_ids in zip(tokens, chosen, values.tolist(), ids.tolist(), strict=True):
        entries = tuple((i, v) for i, v in zip(row_ids, row_values, strict=True) if v != float("-inf"))
        out.append(TokenLogprob(token, lp, entries))
    return tuple(out)
