"""The drafter: embeddings, layers 0..N-1, the exit layer, final norm and head; it proposes draft blocks.

Pipelined drafting (docs/architecture.md §5.3): while round r is verified, `lookahead` feeds r's last draft and guesses
the request of round r+1 as it will be if the verifier accepts the whole block and its bonus token is
the drafter's own top token; proposing that request ahead of time yields exactly the block a fresh
round would draft, so a right guess only saves time and a wrong one is dropped.
"""

import random
from collections.abc import Callable
from pathlib import Path

from eesd.batch import Job, run_job
from eesd.checkpoint import CheckpointReader, config_hash, load_config
from eesd.decoder_stack import Row, build_stack
from eesd.errors import InvalidArgument
from eesd.exit_layer import load_exit_head, state_hash, untrained_exit_layer, validate_exit_layer
from eesd.hardware import resolve_dtype
from eesd.identity import ModelIdentity, tokenizer_hash
from eesd.params import check_token_ids
from eesd.policies import DraftPolicy, make_policy
from eesd.rounds import DraftBlock, DraftRequest
from eesd.sampling import round_generator, round_seed, sample, sparse_top, target_probs
from eesd.session import next_draft_request


class Drafter:
    def __init__(
        self,
        model_dir: str | Path,
        exit_layer: int,
        exit_head: str | Path | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        max_sessions: int = 256,
        kv_tokens: int = 0,
        draft_top_k: int = 32,
    ):
        self.config = load_config(model_dir)
        validate_exit_layer(exit_layer, self.config)
        if draft_top_k < 1:
            raise InvalidArgument("draft_top_k", f"must be >= 1, got {draft_top_k}")
        torch_dtype = resolve_dtype(dtype, device)
        reader = CheckpointReader.open(model_dir)
        exit_state = (
            load_exit_head(exit_head, self.config, exit_layer, torch_dtype)
            if exit_head
            else untrained_exit_layer(reader, self.config, torch_dtype)
        )
        self.identity = ModelIdentity(
            self.config.model_type,
            config_hash(self.config),
            tokenizer_hash(model_dir),
            str(torch_dtype).removeprefix("torch."),
            exit_layer,
            state_hash(exit_state),
        )
        self.stack = build_stack(self.config, reader, list(range(exit_layer)), torch_dtype, device, [exit_state])
        self.sessions = self.stack.new_pool(kv_tokens or None, max_sessions)
        self.draft_top_k = draft_top_k

    def propose(self, request: DraftRequest, stop: Callable[[], bool] = lambda: False) -> DraftBlock:
        """`propose_job` alone."""
        return run_job(self.stack, self.propose_job(request, stop))

    def propose_job(
        self,
        request: DraftRequest,
        stop: Callable[[], bool] = lambda: False,
        measured_cost: float | None = None,
        budget: int | None = None,
        pooled: tuple[float, float] = (0.0, 0.0),
    ) -> Job[DraftBlock]:
        """Feeds the pending tokens, then drafts token by token while the policy says so: one row per step,
        so sessions batched together stop at their own k. `stop` is asked between drafts; when it says so,
        drafting ends with DraftStopped. `measured_cost` (the draft cost ratio) and `pooled` (the recent
        verdicts, VerdictPool.prior) are what load-aware policies size blocks by; `budget` the k a batch
        drafting in lock step chose for this session instead of its policy's bound."""
        check_token_ids("pending_tokens", request.pending, self.config.vocab_size)
        request.sampling.validate()  # the internal API checks what the controller would have
        policy, rng = round_policy(request, measured_cost, pooled)
        generator = round_generator(request.seed, request.round_index, "draft")
        cache = self.sessions.at_base(request.key, request.base_length, request.pending)
        budget = min(policy.begin_round(rng) if budget is None else min(budget, policy.k_max), request.max_tokens)
        logits = (yield Row(request.pending, cache, len(request.pending) - 1))[-1]  # (vocab,)
        if budget <= 0:
            # No drafts this round, but the pending tokens are fed all the same: a drafter that fell behind
            # would make the next drafting round's verifier recompute what it skipped.
            return DraftBlock([], [], budget=0, cache_length=cache.length)
        sampling = request.sampling
        tokens, confidences, q_ids, q_probs = [], [], [], []
        while True:
            if sampling.greedy:
                probs = logits.float().softmax(-1)
                token = int(probs.argmax())
                confidence = float(probs[token])
            else:
                ids, probs = sparse_top(target_probs(logits, sampling), self.draft_top_k)
                pick = sample(probs, generator)
                token, confidence = int(ids[pick]), float(probs[pick])
                q_ids.append(ids.tolist())
                q_probs.append(probs.tolist())
            tokens.append(token)
            confidences.append(confidence)
            if len(tokens) >= budget or not policy.keep_drafting(len(tokens), confidence, rng):
                break
            if stop():
                raise DraftStopped(request.session_id)
            logits = (yield Row([token], cache))[-1]
        return DraftBlock(
            tokens,
            confidences,
            None if sampling.greedy else q_ids,
            None if sampling.greedy else q_probs,
            budget,
            cache.length,
        )

    def lookahead(
        self, request: DraftRequest, block: DraftBlock, stop: Callable[[], bool] = lambda: False
    ) -> DraftRequest | None:
        """`lookahead_job` alone."""
        return run_job(self.stack, self.lookahead_job(request, block, stop))

    def lookahead_job(
        self, request: DraftRequest, block: DraftBlock, stop: Callable[[], bool] = lambda: False
    ) -> Job[DraftRequest | None]:
        """Feeds the block's last draft (so the cache covers the whole block) and guesses round r+1's
        request; None when round r+1 will not draft. The cache must still end where `block` left it."""
        cache = self.sessions.get(request.key)
        if stop() or cache.length != block.cache_length:
            raise DraftStopped(request.session_id)
        logits = (yield Row(block.tokens[-1:], cache))[-1]  # (vocab,)
        # The verifier's bonus token is its top token (greedy) or a draw from p: the drafter's top token
        # is the likeliest match either way.
        return next_draft_request(request, block, int(logits.argmax()))


def round_policy(
    request: DraftRequest, measured_cost: float | None = None, pooled: tuple[float, float] = (0.0, 0.0)
) -> tuple[DraftPolicy, random.Random]:
    """The session's policy for this round and the random stream its decisions draw from (seeded by the
    round, so whoever asks the policy draws the same)."""
    policy = make_policy(request.policy, request.policy_state, measured_cost, pooled)
    return policy, random.Random(round_seed(request.seed, request.round_index, "policy"))


class DraftStopped(Exception):
    """Drafting ahead was stopped (the guess it rested on failed, or other work wants the node)."""
