"""VerifierService: converts messages and calls eesd.verifier.Verifier; nothing else."""

import time

from grpc import aio

from eesd.errors import EesdError, InvalidArgument
from eesd.kv_cache import CacheBehind
from eesd_proto.eesd.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from serving import convert
from serving.errors import status_of
from serving.node import ModelNode
from serving.session_rpcs import SessionRpcs


class VerifierServicer(SessionRpcs, verifier_pb2_grpc.VerifierServiceServicer):
    messages, prefix, role = verifier_pb2, "VerifierService", common_pb2.NODE_ROLE_VERIFIER

    def __init__(self, node: ModelNode):
        self.node = node

    async def Verify(self, request: verifier_pb2.VerifyRequest, context: aio.ServicerContext):
        return verifier_pb2.VerifyResponse(**await self._verify(request))

    async def VerifyStream(self, request_iterator, context: aio.ServicerContext):
        """One drafter's persistent stream: a hello each way, then one answer per round, in order."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello", "the first message of a VerifyStream must be a hello")
        convert.identity_from_proto(first.hello.identity).check_pairs_with(self.node.model.identity)
        yield verifier_pb2.VerifyStreamResponse(
            hello=verifier_pb2.VerifyHello(
                identity=convert.identity_to_proto(self.node.model.identity),
                node_id=self.node.node_id,
                mode=verifier_pb2.VERIFY_MODE_RECOMPUTE,
            )
        )
        async for message in request_iterator:
            request = message.verify_request
            try:
                yield verifier_pb2.VerifyStreamResponse(**await self._verify(request))
            except EesdError as error:  # one bad round must not end the stream other sessions share
                yield verifier_pb2.VerifyStreamResponse(
                    round_error=verifier_pb2.RoundError(
                        session_id=request.session_id,
                        round=request.round,
                        base_length=request.base_length,
                        code=status_of(error).value[0],
                        message=str(error),
                    )
                )

    async def _verify(self, request: verifier_pb2.VerifyRequest) -> dict:
        """{'verdict': ...} or {'cache_mismatch': ...}, the oneof both response messages share."""
        start, cached = time.perf_counter(), self.node.cache_length(request.session_id)
        try:
            verdict = await self.node.run(self.node.model.verify, convert.verify_request_from_proto(request))
        except CacheBehind as behind:
            return {"cache_mismatch": self._mismatch(request, behind)}
        verify_ms = (time.perf_counter() - start) * 1e3
        fed = len(request.pending_token_ids) + len(request.draft.token_ids)
        self.node.metrics.rollback(cached + fed - verdict.cache_length)
        return {"verdict": convert.verdict_to_proto(verdict, request.base_length, verify_ms)}
