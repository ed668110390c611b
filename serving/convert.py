"""Proto messages <-> core dataclasses, 1:1. Servicers call these and the core, nothing else."""

import grpc

from eesd.identity import ModelIdentity
from eesd.load import NodeLoad, PassCost
from eesd.params import NO_LOGPROBS, PolicyParams, SamplingParams
from eesd.rounds import DraftBlock, DraftRequest, RoundStats, TokenLogprob, Verdict, VerifyRequest
from eesd_proto.eesd.v1 import common_pb2, controller_pb2, drafter_pb2, verifier_pb2

DEFAULT_K_MAX = 8


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    # proto3 defaults (0) mean "no filter" for top_p as for top_k.
    return SamplingParams(msg.temperature, msg.top_k, msg.top_p or 1.0, msg.seed if msg.HasField("seed") else None)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed
    )


def policy_from_proto(msg: common_pb2.PolicyParams, default: PolicyParams | None = None) -> PolicyParams:
    """The request's policy; fields it leaves unset come from `default` (a request that names no policy
    gets the default's options too, under its own)."""
    default = default or PolicyParams(k_max=DEFAULT_K_MAX)
    options = dict(msg.options) if msg.name else {**default.options, **msg.options}
    return PolicyParams(msg.name or default.name, msg.k_max if msg.HasField("k_max") else default.k_max, options)


def policy_to_proto(params: PolicyParams) -> common_pb2.PolicyParams:
    return common_pb2.PolicyParams(name=params.name, k_max=params.k_max, options=params.options)


def top_logprobs_from_proto(msg) -> int:
    """A request's optional top_logprobs: unset is NO_LOGPROBS (the range is checked by the core)."""
    return msg.top_logprobs if msg.HasField("top_logprobs") else NO_LOGPROBS


def top_logprobs_to_proto(top_logprobs: int) -> int | None:
    return None if top_logprobs == NO_LOGPROBS else top_logprobs


def logprobs_to_proto(logprobs: tuple[TokenLogprob, ...] | None) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token,
            logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=i, logprob=v) for i, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def logprobs_from_proto(messages, asked: bool) -> tuple[TokenLogprob, ...] | None:
    """The repeated TokenLogprob of a message; None unless the request `asked` for them."""
    if not asked:
        return None
    return tuple(TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top)) for m in messages)


def identity_to_proto(identity: ModelIdentity) -> common_pb2.ModelIdentity:
    return common_pb2.ModelIdentity(**vars(identity))


def identity_from_proto(msg: common_pb2.ModelIdentity) -> ModelIdentity:
    return ModelIdentity(
        msg.model_type, msg.config_hash, msg.tokenizer_hash, msg.dtype, msg.exit_layer, msg.exit_head_hash
    )


def draft_request_from_proto(msg: drafter_pb2.DraftRequest) -> DraftRequest:
    return DraftRequest(
        msg.session_id,
        msg.round,
        msg.base_length,
        list(msg.pending_token_ids),
        msg.max_tokens,
        msg.seed,
        sampling_from_proto(msg.sampling),
        policy_from_proto(msg.policy),
        dict(msg.policy_state),
        msg.round_overhead_ms / 1e3,
        msg.owner,
        top_logprobs_from_proto(msg),
    )


def draft_request_to_proto(request: DraftRequest, verifier_address: str, verifier_id: str) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(
        session_id=request.session_id,
        round=request.round_index,
        base_length=request.base_length,
        pending_token_ids=request.pending,
        max_tokens=request.max_tokens,
        seed=request.seed,
        sampling=sampling_to_proto(request.sampling),
        policy=policy_to_proto(request.policy),
        policy_state=request.policy_state,
        verifier_address=verifier_address,
        verifier_id=verifier_id,
        round_overhead_ms=request.round_overhead_s * 1e3,
        owner=request.owner,
        top_logprobs=top_logprobs_to_proto(request.top_logprobs),
    )


def draft_block_to_proto(block: DraftBlock) -> verifier_pb2.DraftBlock:
    q = [
        verifier_pb2.SparseDistribution(token_ids=ids, probs=probs)
        for ids, probs in zip(block.q_ids or [], block.q_probs or [], strict=True)
    ]
    return verifier_pb2.DraftBlock(
        token_ids=block.tokens, confidences=block.confidences, q=q, budget=block.budget, cache_length=block.cache_length
    )


def draft_block_from_proto(msg: verifier_pb2.DraftBlock) -> DraftBlock:
    sparse = bool(msg.q)
    return DraftBlock(
        list(msg.token_ids),
        list(msg.confidences),
        [list(d.token_ids) for d in msg.q] if sparse else None,
        [list(d.probs) for d in msg.q] if sparse else None,
        msg.budget,
        msg.cache_length,
    )


def verify_request_to_proto(request: VerifyRequest) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(
        session_id=request.session_id,
        round=request.round_index,
        base_length=request.base_length,
        pending_token_ids=request.pending,
        draft=draft_block_to_proto(request.draft),
        seed=request.seed,
        sampling=sampling_to_proto(request.sampling),
        owner=request.owner,
        top_logprobs=top_logprobs_to_proto(request.top_logprobs),
    )


def verify_request_from_proto(msg: verifier_pb2.VerifyRequest) -> VerifyRequest:
    return VerifyRequest(
        msg.session_id,
        msg.round,
        msg.base_length,
        list(msg.pending_token_ids),
        draft_block_from_proto(msg.draft),
        msg.seed,
        sampling_from_proto(msg.sampling),
        msg.owner,
        top_logprobs_from_proto(msg),
    )


def verdict_to_proto(
    verdict: Verdict, request: VerifyRequest, verify_ms: float, load: NodeLoad | None = None
) -> verifier_pb2.Verdict:
    """The verdict on `request`, echoing the request's base length and owner."""
    return verifier_pb2.Verdict(
        session_id=verdict.session_id,
        owner=request.owner,
        round=verdict.round_index,
        base_length=request.base_length,
        accepted=verdict.accepted,
        next_token=verdict.next_token,
        cache_length=verdict.cache_length,
        verify_ms=verify_ms,
        load=None if load is None else load_to_proto(load),
        logprobs=logprobs_to_proto(verdict.logprobs),
    )


def load_to_proto(load: NodeLoad) -> common_pb2.NodeLoad:
    return common_pb2.NodeLoad(
        fixed_ms=load.cost.fixed_s * 1e3, per_token_ms=load.cost.per_token_s * 1e3, rows_per_pass=load.rows_per_pass
    )


def load_from_proto(msg: common_pb2.NodeLoad) -> NodeLoad:
    return NodeLoad(PassCost(msg.fixed_ms / 1e3, msg.per_token_ms / 1e3), msg.rows_per_pass)


def verdict_from_proto(msg: verifier_pb2.Verdict, top_logprobs: int = NO_LOGPROBS) -> Verdict:
    """The verdict on a request that asked for `top_logprobs` (its logprobs are None unless it asked)."""
    logprobs = logprobs_from_proto(msg.logprobs, top_logprobs != NO_LOGPROBS)
    return Verdict(msg.session_id, msg.round, msg.accepted, msg.next_token, msg.cache_length, logprobs)


def round_stats_to_proto(
    stats: RoundStats, transport_ms: float = 0.0, controller_ms: float = 0.0
) -> common_pb2.RoundStats:
    return common_pb2.RoundStats(
        k_chosen=stats.k_chosen,
        drafted=stats.drafted,
        accepted=stats.accepted,
        committed=stats.committed,
        draft_ms=stats.draft_s * 1e3,
        verify_ms=stats.verify_s * 1e3,
        transport_ms=transport_ms,
        controller_ms=controller_ms,
    )


def cache_mismatch(request, cache_length: int, role: int, node_id: str) -> common_pb2.CacheMismatch:
    """The answer to `request` (a round or prefill message) whose base lies beyond the node's cache."""
    return common_pb2.CacheMismatch(
        session_id=request.session_id,
        owner=request.owner,
        round=request.round,
        base_length=request.base_length,
        cache_length=cache_length,
        node_role=role,
        node_id=node_id,
        session_open=cache_length > 0,
    )


def session_error_to_proto(code: str, message: str) -> controller_pb2.SessionError | None:
    """A failed session's stored status (a grpc.StatusCode name and message); None for other sessions."""
    if not code:
        return None
    return controller_pb2.SessionError(code=grpc.StatusCode[code].value[0], message=message)
