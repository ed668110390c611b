"""A drafter's persistent VerifyStream to one verifier, multiplexing the rounds of all its sessions.

The stream opens with a hello each way (the verifier refuses a drafter of another model); each round is
one message out and one answer back, matched by (session, round). A broken stream fails the rounds
waiting on it with UNAVAILABLE and is reopened by the next round.
"""

import asyncio
import logging
import math
import socket
import time

import grpc

from eesd.errors import EesdError, FailedPrecondition, InvalidArgument, Unavailable
from eesd.identity import ModelIdentity
from eesd_proto.eesd.v1 import verifier_pb2, verifier_pb2_grpc
from serving import convert
from serving.addresses import join_host_port, parse_addresses, split_host_port
from serving.errors import error_of
from serving.security import Peers
from serving.server import channel

log = logging.getLogger(__name__)


# What grpc.aio raises on a call that has already finished, besides AioRpcError.
STREAM_ENDED = (grpc.aio.UsageError, asyncio.InvalidStateError)


def verifier_error(code: grpc.StatusCode | int, message: str) -> EesdError:
    """The verifier's failure as a domain error; an unavailable verifier is named so the controller replaces it."""
    error = error_of(code, message)
    if isinstance(error, Unavailable):
        error.peer = "verifier"
    return error


class VerifierLink:
    def __init__(
        self, address: str, identity: ModelIdentity, node_id: str, timeout_s: float, peers: Peers | None = None
    ):
        self.address, self.identity, self.node_id, self.timeout_s = address, identity, node_id, timeout_s
        self.peers = peers
        self._channel = channel(address, peers)  # TLS and the internal token, as configured
        self._generation = peers.generation() if peers is not None else 0
        self._call = None
        self._reader: asyncio.Task | None = None
        self._waiters: dict[tuple[str, str, int], asyncio.Future] = {}
        self._sending: set[asyncio.Task] = set()  # rounds being written (held: the loop keeps weak references)
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        if self.peers is not None and self.peers.generation() != self._generation:
            # Renewed certificate files: the new stream goes out on a channel that presents the new one.
            self._generation = self.peers.generation()
            old, self._channel = self._channel, channel(self.address, self.peers)
            await old.close()
        stub = verifier_pb2_grpc.VerifierServiceStub(self._channel)
        call = stub.VerifyStream()
        try:
            await call.write(
                verifier_pb2.VerifyStreamRequest(
                    hello=verifier_pb2.VerifyHello(
                        identity=convert.identity_to_proto(self.identity),
                        node_id=self.node_id,
                        mode=verifier_pb2.VERIFY_MODE_RECOMPUTE,
                    )
                )
            )
            answer = await asyncio.wait_for(call.read(), self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise verifier_error(err.code(), f"verifier {self.address}: {err.details()}") from err
        except TimeoutError as err:
            call.cancel()
            raise Unavailable(f"verifier {self.address} did not answer the hello", peer="verifier") from err
        if answer is grpc.aio.EOF or answer.WhichOneof("kind") != "hello":
            raise FailedPrecondition(f"verifier {self.address} did not answer with a hello")
        self.identity.check_pairs_with(convert.identity_from_proto(answer.hello.identity))
        self._call = call
        self._reader = asyncio.create_task(self._read(call))

    async def _read(self, call) -> None:
        # read() rather than `async for`: grpc.aio refuses to mix both styles on one call (the hello used read()).
        try:
            while (answer := await call.read()) is not grpc.aio.EOF:
                body = getattr(answer, answer.WhichOneof("kind"))
                waiter = self._waiters.pop((body.session_id, body.owner, body.round), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
            reason = "closed the stream"
        except grpc.aio.AioRpcError as err:
            reason = f"stream failed: {err.code().name} {err.details()}"
        except STREAM_ENDED as err:
            reason = f"stream ended: {err!r}"
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this reader is being stopped
                raise
            reason = "stream cancelled"  # grpc raises it for a call cancelled here: the rounds waiting fail now
        self._fail_all(call, Unavailable(f"verifier {self.address} {reason}", peer="verifier"))

    def _fail_all(self, call, error: EesdError) -> None:
        """Fails the rounds waiting on `call`; a newer stream opened meanwhile is left alone."""
        if call is not self._call:
            return
        self._call = None
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def verify(self, request: verifier_pb2.VerifyRequest) -> verifier_pb2.VerifyStreamResponse:
        """Sends one round and waits for its verdict, cache mismatch or error (raised as a domain error)."""
        key = (request.session_id, request.owner, request.round)  # what the answer echoes
        waiter = asyncio.get_running_loop().create_future()
        # The write runs in a task of its own: grpc ends a stream whose write is cancelled, and this stream
        # carries every session's rounds, so a caller that goes away (a dropped lookahead) must not cancel it.
        sending = asyncio.create_task(self._send(key, waiter, request))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        try:
            answer = await asyncio.wait_for(waiter, self.timeout_s)
        except TimeoutError as err:
            raise Unavailable(
                f"verifier {self.address} gave no verdict in {self.timeout_s} s", peer="verifier"
            ) from err
        finally:  # answered, timed out, or the caller went away: the round waits no more
            self._waiters.pop(key, None)
        if answer.WhichOneof("kind") == "round_error":
            raise verifier_error(answer.round_error.code, answer.round_error.message)
        return answer

    async def _send(self, key: tuple[str, str, int], waiter: asyncio.Future, request: verifier_pb2.VerifyRequest):
        """Writes one round on the stream, opening it first if need be; a failure goes to the round's waiter."""
        try:
            async with self._lock:  # one writer at a time on the stream
                # A stream the verifier ended (e.g. it restarted) may not have been noticed by the reader yet:
                # writing to it fails, and the round goes out once more on a fresh stream.
                for attempt in range(2):
                    if waiter.done():  # the caller stopped waiting: nothing to send
                        return
                    if self._call is None:
                        await self._open()
                    call = self._call
                    self._waiters[key] = waiter
                    try:
                        await call.write(verifier_pb2.VerifyStreamRequest(verify_request=request))
                        return
                    except (grpc.aio.AioRpcError, *STREAM_ENDED) as err:
                        self._waiters.pop(key, None)
                        self._fail_all(call, Unavailable(f"verifier {self.address}: {err!r}", peer="verifier"))
                        if attempt == 1:
                            raise Unavailable(
                                f"verifier {self.address} stream broke: {err!r}", peer="verifier"
                            ) from err
        except Exception as error:  # noqa: BLE001 - the round's caller gets it, as if it had written itself
            if not waiter.done():
                waiter.set_exception(error)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()


class VerifierAllowlist:
    """The verifiers this drafter may stream to, so that a request cannot make it dial an address of its
    choosing: the configured host:port list, each host standing for every address it resolves to (a
    headless Service resolves to every verifier pod), looked up again at most every `refresh_s` seconds
    when a request names an address not known yet."""

    def __init__(self, addresses: str, refresh_s: float = 5.0):
        self._configured = set(parse_addresses(addresses))
        self._targets = [split_host_port(address) for address in self._configured]
        self._resolved: set[str] = set()
        self._resolved_at = -math.inf
        self.refresh_s = refresh_s

    async def allows(self, address: str) -> bool:
        if address in self._configured or address in self._resolved:
            return True
        if time.monotonic() - self._resolved_at < self.refresh_s:
            return False
        self._resolved_at = time.monotonic()
        found: set[str] = set()
        for host, port in self._targets:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:  # keep what the other names resolve to
                log.warning("DNS lookup of verifier %s failed: %s", host, err)
                continue
            found.update(join_host_port(info[4][0], port) for info in infos)
        self._resolved = found
        return address in found


class VerifierLinks:
    """One link per allowed verifier address, created on first use."""

    def __init__(
        self,
        identity: ModelIdentity,
        node_id: str,
        timeout_s: float,
        allowlist: VerifierAllowlist,
        peers: Peers | None = None,
    ):
        self.identity, self.node_id, self.timeout_s = identity, node_id, timeout_s
        self.allowlist, self.peers = allowlist, peers
        self._links: dict[str, VerifierLink] = {}

    async def get(self, address: str) -> VerifierLink:
        if address not in self._links:
            if not await self.allowlist.allows(address):
                raise InvalidArgument("verifier_address", "not one of the verifiers this drafter is configured with")
            self._links[address] = VerifierLink(address, self.identity, self.node_id, self.timeout_s, self.peers)
        return self._links[address]

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))
