"""The controller's calls to drafters and verifiers, in core dataclasses; gRPC stays in here."""

import asyncio
import logging
from dataclasses import dataclass

import grpc

from controller.liveness import Liveness
from eesd.errors import FailedPrecondition, Unavailable
from eesd.rounds import DraftBlock, DraftRequest, Verdict, VerifyRequest
from eesd_proto.eesd.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from serving import convert
from serving.errors import UNAVAILABLE_PEER_KEY, error_of
from serving.security import Peers
from serving.server import channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    draft: DraftBlock
    verdict: Verdict
    drafter_cache_length: int | None  # None: a verifier-only round, no drafter took part
    draft_ms: float
    verify_ms: float
    transport_ms: float


@dataclass(frozen=True)
class Mismatch:
    """A node's cache covers fewer committed tokens than the round assumed."""

    role: str  # "drafter" or "verifier"
    cache_length: int


def _mismatch(msg) -> Mismatch:
    role = "drafter" if msg.node_role == convert.common_pb2.NODE_ROLE_DRAFTER else "verifier"
    return Mismatch(role, msg.cache_length)


def _error(err: grpc.aio.AioRpcError, role: str, address: str) -> Exception:
    """A failed call as a domain error; an unavailable node carries the role to replace."""
    peer = dict(err.trailing_metadata() or ()).get(UNAVAILABLE_PEER_KEY, role)
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{role} {address}: {err.details()}", peer=peer)
    return error_of(err.code(), err.details() or "")


class NodeClients:
    """Calls to drafters and verifiers; a call to a node that liveness declares lost ends at once."""

    def __init__(
        self,
        timeout_s: float,
        probe_s: float = 1.0,
        lost_s: float = 5.0,
        checkpoint: tuple[str, str] | None = None,
        peers: Peers | None = None,
    ):
        self.timeout_s = timeout_s
        self.peers = peers  # TLS and the internal token of the calls (serving/security.py)
        self._generation = peers.generation() if peers is not None else 0
        self._retiring: set[asyncio.Task] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.liveness = Liveness(self._channel, probe_s, lost_s)
        self.checkpoint = checkpoint  # (model_type, tokenizer_hash) of the controller's model_dir, if any
        self._checked: dict[str, str] = {}  # address -> "" (serves the checkpoint) or why it does not

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self.peers is not None and self.peers.generation() != self._generation:
            # Renewed certificate files: new channels present the new client certificate; the old ones
            # close once their calls are done (a round's deadline at most).
            self._generation = self.peers.generation()
            old, self._channels = self._channels, {}
            for ch in old.values():
                task = asyncio.get_running_loop().create_task(ch.close(grace=self.timeout_s))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        if address not in self._channels:
            self._channels[address] = channel(address, self.peers)
        return self._channels[address]

    async def draft(self, drafter: str, request: DraftRequest, verifier: str) -> RoundOutcome | Mismatch:
        stub = drafter_pb2_grpc.DrafterServiceStub(self._channel(drafter))
        call = stub.Draft(convert.draft_request_to_proto(request, verifier, verifier), timeout=self.timeout_s)
        try:
            reply = await self.liveness.guard(call, {drafter: "drafter", verifier: "verifier"})
        except grpc.aio.AioRpcError as err:
            raise _error(err, "drafter", drafter) from err
        if reply.WhichOneof("outcome") == "cache_mismatch":
            return _mismatch(reply.cache_mismatch)
        result = reply.result
        return RoundOutcome(
            convert.draft_block_from_proto(result.draft),
            convert.verdict_from_proto(result.verdict, request.top_logprobs),
            result.drafter_cache_length,
            result.stats.draft_ms,
            result.stats.verify_ms,
            result.stats.transport_ms,
        )

    async def verify(self, verifier: str, request: VerifyRequest) -> RoundOutcome | Mismatch:
        """A verifier-only round (no drafts): plain autoregressive decoding, one token."""
        stub = verifier_pb2_grpc.VerifierServiceStub(self._channel(verifier))
        call = stub.Verify(convert.verify_request_to_proto(request), timeout=self.timeout_s)
        try:
            reply = await self.liveness.guard(call, {verifier: "verifier"})
        except grpc.aio.AioRpcError as err:
            raise _error(err, "verifier", verifier) from err
        if reply.WhichOneof("outcome") == "cache_mismatch":
            return _mismatch(reply.cache_mismatch)
        return RoundOutcome(
            request.draft,
            convert.verdict_from_proto(reply.verdict, request.top_logprobs),
            None,
            0.0,
            reply.verdict.verify_ms,
            0.0,
        )

    def _session_rpcs(self, role: str, address: str):
        """The node's stub and a constructor of its session-RPC messages (names carry the service prefix)."""
        module, stub_cls, prefix = (
            (drafter_pb2, drafter_pb2_grpc.DrafterServiceStub, "DrafterService")
            if role == "drafter"
            else (verifier_pb2, verifier_pb2_grpc.VerifierServiceStub, "VerifierService")
        )
        return stub_cls(self._channel(address)), lambda name, **fields: getattr(module, prefix + name)(**fields)

    async def check_identity(self, role: str, address: str) -> None:
        """FailedPrecondition if the node serves another checkpoint than the controller's model_dir (another
        tokenizer, another model type: a deployment mistake that would stream wrong text); asked once per node."""
        if self.checkpoint is None:
            return
        if address not in self._checked:
            stub, message = self._session_rpcs(role, address)
            call = stub.GetModelIdentity(message("GetModelIdentityRequest"), timeout=self.timeout_s)
            try:
                reply = await self.liveness.guard(call, {address: role})
            except grpc.aio.AioRpcError as err:
                raise _error(err, role, address) from err
            try:
                convert.identity_from_proto(reply.identity).check_checkpoint(*self.checkpoint)
                self._checked[address] = ""
            except FailedPrecondition as wrong:
                log.error("%s %s: %s", role, address, wrong)
                self._checked[address] = str(wrong)
        if self._checked[address]:
            raise FailedPrecondition(f"{role} {address}: {self._checked[address]}")

    async def open_session(self, role: str, address: str, session_id: str, owner: str, reserve_tokens: int) -> int:
        """Opens the session on a node, reserving its whole length in the node's KV pool."""
        await self.check_identity(role, address)
        stub, message = self._session_rpcs(role, address)
        request = message("OpenSessionRequest", session_id=session_id, owner=owner, reserve_tokens=reserve_tokens)
        try:
            reply = await self.liveness.guard(stub.OpenSession(request, timeout=self.timeout_s), {address: role})
        except grpc.aio.AioRpcError as err:
            raise _error(err, role, address) from err
        return reply.cache_length

    async def prefill(
        self,
        role: str,
        address: str,
        session_id: str,
        owner: str,
        round_index: int,
        base_length: int,
        token_ids: list[int],
    ) -> int | Mismatch:
        """Brings a lagging node's cache up to base_length + len(token_ids)."""
        stub, message = self._session_rpcs(role, address)
        request = message(
            "PrefillRequest",
            session_id=session_id,
            owner=owner,
            round=round_index,
            base_length=base_length,
            token_ids=token_ids,
        )
        try:
            reply = await self.liveness.guard(stub.Prefill(request, timeout=self.timeout_s), {address: role})
        except grpc.aio.AioRpcError as err:
            raise _error(err, role, address) from err
        if reply.WhichOneof("outcome") == "cache_mismatch":
            return _mismatch(reply.cache_mismatch)
        return reply.cache_length

    async def close_session(self, role: str, address: str, session_id: str, owner: str) -> None:
        """Best effort: a node that is gone has nothing to free."""
        stub, message = self._session_rpcs(role, address)
        request = message("CloseSessionRequest", session_id=session_id, owner=owner)
        try:
            await stub.CloseSession(request, timeout=5.0)
        except grpc.aio.AioRpcError:
            pass

    async def close(self) -> None:
        await self.liveness.aclose()
        for ch in self._channels.values():
            await ch.close()
