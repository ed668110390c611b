"""The verifier: the full model; scores a draft block in one forward pass and applies the acceptance rule.

`verify_job` is one session's part of a pass, which the node batches with other sessions' (eesd.batch);
a handoff mode (drafter ships layer-N hidden states) can add a field to the request without changing the
contract.
"""

from pathlib import Path

import torch

from eesd.acceptance import accept_greedy, accept_stochastic
from eesd.batch import Job, run_job
from eesd.checkpoint import CheckpointReader, config_hash, load_config
from eesd.decoder_stack import Row, build_stack
from eesd.errors import InvalidArgument
from eesd.hardware import resolve_dtype
from eesd.identity import ModelIdentity, tokenizer_hash
from eesd.logprobs import token_logprobs
from eesd.params import NO_LOGPROBS, check_token_ids, check_top_logprobs
from eesd.rounds import DraftBlock, Verdict, VerifyRequest
from eesd.sampling import densify, round_generator, target_probs


def check_draft(draft: DraftBlock, greedy: bool, vocab_size: int) -> None:
    """A malformed draft block would silently break losslessness; refuse it."""
    check_token_ids("draft.tokens", draft.tokens, vocab_size)
    if len(draft.confidences) not in (0, len(draft.tokens)):
        raise InvalidArgument("draft.confidences", "must be empty or one per draft token")
    if greedy or not draft.tokens:
        return
    if draft.q_ids is None or draft.q_probs is None or not len(draft.q_ids) == len(draft.q_probs) == len(draft.tokens):
        raise InvalidArgument("draft.q", "sampling needs sparse q (ids and probs) for every draft token")
    for token, ids, probs in zip(draft.tokens, draft.q_ids, draft.q_probs, strict=True):
        check_token_ids("draft.q_ids", ids, vocab_size)
        if len(ids) != len(probs) or token not in ids:
            raise InvalidArgument("draft.q", "each draft token must be in its q support, ids and probs paired")
        if any(not 0.0 <= p <= 1.0 for p in probs) or abs(sum(probs) - 1.0) > 1e-3:
            raise InvalidArgument("draft.q_probs", "each q must be a distribution (non-negative, summing to 1)")


class Verifier:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        max_sessions: int = 256,
        kv_tokens: int = 0,
    ):
        self.config = load_config(model_dir)
        torch_dtype = resolve_dtype(dtype, device)
        reader = CheckpointReader.open(model_dir)
        self.identity = ModelIdentity(
            self.config.model_type,
            config_hash(self.config),
            tokenizer_hash(model_dir),
            str(torch_dtype).removeprefix("torch."),
        )
        self.stack = build_stack(self.config, reader, list(range(self.config.num_hidden_layers)), torch_dtype, device)
        self.sessions = self.stack.new_pool(kv_tokens or None, max_sessions)

    def verify(self, request: VerifyRequest) -> Verdict:
        """`verify_job` alone."""
        return run_job(self.stack, self.verify_job(request))

    def verify_job(self, request: VerifyRequest) -> Job[Verdict]:
        """Feeds pending + drafts in one row, keeps the accepted prefix, crops the rest of the cache."""
        draft, sampling = request.draft, request.sampling
        check_token_ids("pending_tokens", request.pending, self.config.vocab_size)
        sampling.validate()  # the internal API checks what the controller would have
        check_top_logprobs(request.top_logprobs)
        check_draft(draft, sampling.greedy, self.config.vocab_size)
        cache = self.sessions.at_base(request.key, request.base_length, request.pending)
        # Row i of the logits predicts draft i; the last row predicts the bonus token.
        logits = yield Row(request.pending + draft.tokens, cache, len(request.pending) - 1)  # (k + 1, vocab)
        tokens = torch.tensor(draft.tokens, dtype=torch.long, device=logits.device)
        if sampling.greedy:
            result = accept_greedy(logits, tokens)
        else:
            generator = round_generator(request.seed, request.round_index, "verify")
            q = densify(draft.q_ids or [], draft.q_probs or [], self.config.vocab_size).to(logits.device)  # (k, vocab)
            result = accept_stochastic(target_probs(logits, sampling), q, tokens, generator)
        cache.crop(request.base_length + len(request.pending) + result.accepted)
        logprobs = None
        if request.top_logprobs != NO_LOGPROBS:  # only when asked: a softmax over rows the rule may not need
            committed = [*draft.tokens[: result.accepted], result.next_token]
            logprobs = token_logprobs(logits, committed, sampling, request.top_logprobs)
        return Verdict(
            request.session_id, request.round_index, result.accepted, result.next_token, cache.length, logprobs
        )
