"""DrafterService: converts messages and calls eesd.drafter.Drafter, then relays the block to the verifier."""

import asyncio
import functools
import math
import time

from grpc import aio

from drafter_service.lookahead import Lookaheads
from drafter_service.verifier_link import VerifierAllowlist, VerifierLink, VerifierLinks
from eesd.errors import InvalidArgument
from eesd.kv_cache import CacheBehind
from eesd.load import NodeLoad, draft_cost_ratio
from eesd.params import session_key
from eesd.policies import VerdictPool
from eesd.rounds import DraftBlock, DraftRequest, RoundStats
from eesd.session import drafter_cache_after
from eesd_proto.eesd.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, verifier_pb2
from serving import convert, tracing
from serving.node import ModelNode
from serving.security import Peers
from serving.session_rpcs import SessionRpcs

MAX_ROUND_OVERHEAD_S = 60.0  # a measured per-round overhead beyond a minute is not a measurement


class DrafterServicer(SessionRpcs, drafter_pb2_grpc.DrafterServiceServicer):
    messages, prefix, role = drafter_pb2, "DrafterService", common_pb2.NODE_ROLE_DRAFTER

    def __init__(
        self,
        node: ModelNode,
        verify_timeout_s: float,
        verifiers: VerifierAllowlist,
        pipeline: bool = True,
        peers: Peers | None = None,
    ):
        self.node, self.peers = node, peers
        self.verify_timeout_s, self.verifiers = verify_timeout_s, verifiers
        self.lookaheads = Lookaheads(node, pipeline, self.sizing)
        self._verifier_loads: dict[str, NodeLoad] = {}  # verifier address -> its load in its last verdict
        self.verdicts = VerdictPool()  # the recent verdicts on this node's blocks, whatever their session
        self._links: VerifierLinks | None = None

    def links(self) -> VerifierLinks:
        if self._links is None:  # the identity exists only once the model has loaded
            self._links = VerifierLinks(
                self.node.model.identity, self.node.node_id, self.verify_timeout_s, self.verifiers, self.peers
            )
        return self._links

    async def Draft(self, request: drafter_pb2.DraftRequest, context: aio.ServicerContext):
        """Drafts under the policy (or takes the block drafted, maybe already verified, ahead for this very
        request), streams it to the verifier, drafts the next round ahead while it waits, and reports the
        verdict."""
        common = dict(session_id=request.session_id, round=request.round, base_length=request.base_length)
        self._check_fits("pending_tokens", len(request.pending_token_ids))
        draft_request = convert.draft_request_from_proto(request)
        overhead = draft_request.round_overhead_s
        if not (math.isfinite(overhead) and 0.0 <= overhead <= MAX_ROUND_OVERHEAD_S):
            raise InvalidArgument("round_overhead_ms", f"must be in [0, {MAX_ROUND_OVERHEAD_S * 1e3:g}]")
        link = await self.links().get(request.verifier_address)  # before any work: only allowed verifiers
        start = time.perf_counter()
        ahead = await self.lookaheads.take(draft_request, request.verifier_address)
        # Drafting afresh crops whatever the cache holds past the base (a dropped lookahead included).
        cropped = 0 if ahead else max(0, self.node.cache_length(draft_request.key) - request.base_length)
        try:
            block = ahead.block if ahead else await self.lookaheads.propose(draft_request, request.verifier_address)
        except CacheBehind as behind:
            return drafter_pb2.DraftResponse(**common, cache_mismatch=self._mismatch(request, behind))
        drafted = time.perf_counter()
        answer = await ahead.answer if ahead and ahead.answer else None
        if answer is None:
            send = functools.partial(self._verify, link)
            verify = asyncio.ensure_future(send(draft_request, block))
            self.lookaheads.start(draft_request, block, request.verifier_address, send)
            answer = await verify
        if answer.WhichOneof("kind") == "cache_mismatch":
            return drafter_pb2.DraftResponse(**common, cache_mismatch=answer.cache_mismatch)
        verdict = answer.verdict
        if verdict.HasField("load"):
            self._verifier_loads[request.verifier_address] = convert.load_from_proto(verdict.load)
        self.verdicts.add(len(block.tokens), verdict.accepted)
        covers_block = await self.lookaheads.settle(
            draft_request, verdict.accepted == len(block.tokens), verdict.next_token
        )
        fed = request.base_length + len(request.pending_token_ids)
        # A lookahead that fed the last draft makes the cache cover the whole (accepted) block.
        cache_length = fed + verdict.accepted if covers_block else drafter_cache_after(block, fed, verdict.accepted)
        self.node.metrics.rollback(cropped + block.cache_length - cache_length)
        round_trip_ms = (time.perf_counter() - drafted) * 1e3
        stats = RoundStats(
            request.round,
            block.budget,
            len(block.tokens),
            verdict.accepted,
            verdict.accepted + 1,
            drafted - start,
            verdict.verify_ms / 1e3,
        )
        return drafter_pb2.DraftResponse(
            **common,
            result=drafter_pb2.RoundResult(
                draft=convert.draft_block_to_proto(block),
                verdict=verdict,
                drafter_cache_length=cache_length,
                stats=convert.round_stats_to_proto(stats, transport_ms=max(0.0, round_trip_ms - verdict.verify_ms)),
            ),
        )

    def sizing(self, request: DraftRequest, verifier_address: str) -> tuple[float | None, tuple[float, float]]:
        """What sizes a load-aware block for `request`'s round, verified by `verifier_address`: the marginal
        cost ratio of a draft token (eesd.load), None until both this node and that verifier have measured
        their passes (Draft checked the request's overhead), and the recent verdicts (VerdictPool.prior)."""
        verifier, own = self._verifier_loads.get(verifier_address), self.node.load_now()
        measured = None
        if verifier is not None and own is not None:
            measured = draft_cost_ratio(verifier, own, request.round_overhead_s)
        return measured, self.verdicts.prior()

    @staticmethod
    async def _verify(
        link: VerifierLink, request: DraftRequest, block: DraftBlock
    ) -> verifier_pb2.VerifyStreamResponse:
        """Streams one round's block to the verifier and waits for its answer; with tracing on, the round's
        verification is a child of the current span (the Draft call's)."""
        message = convert.verify_request_to_proto(request.verify_request(block))
        message.traceparent = tracing.traceparent()
        return await link.verify(message)

    async def Prefill(self, request, context: aio.ServicerContext):
        await self.lookaheads.drop(session_key(request.session_id, request.owner))
        return await super().Prefill(request, context)

    async def CloseSession(self, request, context: aio.ServicerContext):
        await self.lookaheads.drop(session_key(request.session_id, request.owner))
        return await super().CloseSession(request, context)

    async def close(self) -> None:
        if self._links is not None:
            await self._links.close()
