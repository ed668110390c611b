"""The session RPCs both model services expose (identity, open, prefill, close), written once.

The drafter's and verifier's request/response messages differ only in their service prefix
(buf wants unique names), so each servicer names its prefix and proto module.
"""

from types import ModuleType

from grpc import aio

from eesd.errors import InvalidArgument
from eesd.kv_cache import CacheBehind
from eesd.params import check_session_key, session_key
from eesd_proto.eesd.v1 import common_pb2
from serving import convert
from serving.node import ModelNode


class SessionRpcs:
    node: ModelNode
    messages: ModuleType  # drafter_pb2 or verifier_pb2
    prefix: str  # "DrafterService" or "VerifierService"
    role: int  # common_pb2.NodeRole

    def _mismatch(self, request, behind: CacheBehind) -> common_pb2.CacheMismatch:
        """The answer to a round or prefill whose base lies beyond this node's cache."""
        return convert.cache_mismatch(request, behind.cache_length, self.role, self.node.node_id)

    def _check_fits(self, field: str, count: int) -> None:
        """Refuses `count` tokens beyond the model's context before they are converted to Python: a 16M-id
        message would take gigabytes as a list, and no round or prefill can hold more than the context."""
        context = self.node.model.sessions.max_context
        if count > context:
            raise InvalidArgument(field, f"{count} tokens: more than the model's context of {context}")

    def _message(self, name: str):
        return getattr(self.messages, f"{self.prefix}{name}")

    async def GetModelIdentity(self, request, context: aio.ServicerContext):
        return self._message("GetModelIdentityResponse")(
            identity=convert.identity_to_proto(self.node.model.identity), node_id=self.node.node_id
        )

    async def OpenSession(self, request, context: aio.ServicerContext):
        if request.HasField("expected_identity"):
            # The node's identity must satisfy what the controller expects, as a drafter must its verifier.
            self.node.model.identity.check_pairs_with(convert.identity_from_proto(request.expected_identity))
        return self._message("OpenSessionResponse")(
            session_id=request.session_id,
            cache_length=await self.node.open_session(
                session_key(request.session_id, request.owner), request.reserve_tokens or None
            ),
        )

    async def Prefill(self, request, context: aio.ServicerContext):
        reply = self._message("PrefillResponse")
        common = dict(session_id=request.session_id, round=request.round, base_length=request.base_length)
        self._check_fits("token_ids", len(request.token_ids))
        try:
            key = session_key(request.session_id, request.owner)
            length = await self.node.prefill(key, request.base_length, list(request.token_ids))
        except CacheBehind as behind:
            self.node.metrics.cache_mismatch()
            return reply(
                **common,
                cache_mismatch=self._mismatch(request, behind),
            )
        return reply(**common, cache_length=length)

    async def CloseSession(self, request, context: aio.ServicerContext):
        key = session_key(request.session_id, request.owner)
        check_session_key(key)  # refused like every other call's, not a silent no-op
        await self.node.close_session(key)
        return self._message("CloseSessionResponse")(session_id=request.session_id)
