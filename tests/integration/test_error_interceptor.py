"""serving.errors.DomainErrorInterceptor on a real grpc.aio server: every exception ends the call with a
status; anything that is not a domain error is INTERNAL with a generic message, logged and counted."""

import asyncio
import logging

import grpc
import pytest
from grpc import aio

from eesd.errors import InvalidArgument, Unavailable
from eesd_proto.eesd.v1 import controller_pb2
from serving.errors import INTERNAL_MESSAGE, UNAVAILABLE_PEER_KEY, DomainErrorInterceptor
from serving.metrics import rpc_metrics

SERVICE = "test.v1.Faulty"
REQUEST = controller_pb2.GetSessionRequest


async def raise_runtime(request, context):
    raise RuntimeError("CUDA out of memory at 0xdeadbeef")


async def raise_invalid(request, context):
    raise InvalidArgument("session_id", "too long")


async def raise_huge(request, context):
    raise InvalidArgument("policy", "unknown policy " + repr("x" * 1_000_000))


async def raise_unavailable(request, context):
    raise Unavailable("verifier gone", peer="verifier")


async def stream_then_raise(request, context):
    yield controller_pb2.GetSessionResponse()
    raise KeyError("secret")


def handlers():
    unary = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, REQUEST.FromString, controller_pb2.GetSessionResponse.SerializeToString
        )
        for name, fn in (
            ("Runtime", raise_runtime),
            ("Invalid", raise_invalid),
            ("Unavailable", raise_unavailable),
            ("Huge", raise_huge),
        )
    }
    unary["Stream"] = grpc.unary_stream_rpc_method_handler(
        stream_then_raise, REQUEST.FromString, controller_pb2.GetSessionResponse.SerializeToString
    )
    return grpc.method_handlers_generic_handler(SERVICE, unary)


def handled(method: str, code: str) -> float:
    return rpc_metrics().handled.labels(SERVICE, method, code)._value.get()


VICTIM = REQUEST(session_id="victim\nforged").SerializeToString()


async def call(method: str, streaming: bool = False, payload: bytes = VICTIM) -> aio.AioRpcError:
    """Sends `payload` (raw request bytes) to a real server with the interceptor; returns the error."""
    server = aio.server(interceptors=[DomainErrorInterceptor()])
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            kind = ch.unary_stream if streaming else ch.unary_unary
            rpc = kind(f"/{SERVICE}/{method}", lambda raw: raw, lambda raw: raw)
            with pytest.raises(aio.AioRpcError) as info:
                if streaming:
                    async for _ in rpc(payload, timeout=10):
                        pass
                else:
                    await rpc(payload, timeout=10)
            return info.value
    finally:
        await server.stop(0)


@pytest.mark.parametrize("method, streaming", [("Runtime", False), ("Stream", True)])
def test_unexpected_exception_is_internal_logged_and_counted(method, streaming, caplog):
    before = handled(method, "INTERNAL")
    with caplog.at_level(logging.ERROR, logger="serving.errors"):
        error = asyncio.run(call(method, streaming))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE  # no raw exception text reaches the client
    [record] = [r for r in caplog.records if r.name == "serving.errors"]
    assert f"/{SERVICE}/{method}" in record.getMessage()
    assert "'victim\\nforged'" in record.getMessage()  # the client's id is quoted: no forged log line
    assert record.exc_info is not None
    assert handled(method, "INTERNAL") == before + 1


def test_domain_errors_keep_their_status_and_message(caplog):
    with caplog.at_level(logging.ERROR, logger="serving.errors"):
        invalid = asyncio.run(call("Invalid"))
        unavailable = asyncio.run(call("Unavailable"))
    assert (invalid.code(), invalid.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "session_id: too long")
    assert unavailable.code() == grpc.StatusCode.UNAVAILABLE
    assert (UNAVAILABLE_PEER_KEY, "verifier") in tuple(unavailable.trailing_metadata())
    assert not [r for r in caplog.records if r.name == "serving.errors"]  # expected outcomes are not errors


def test_details_quoting_client_input_are_bounded():
    """A message that echoes a 1 MB field would break the trailers' size limit: it is cut, not lost."""
    error = asyncio.run(call("Huge"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("policy: unknown policy 'xxx") and len(error.details()) <= 1024


@pytest.mark.parametrize(("method", "streaming"), [("Invalid", False), ("Stream", True)])
def test_undecodable_request_bytes_are_invalid_argument(method, streaming):
    error = asyncio.run(call(method, streaming, payload=b"\xff\xff\xff\xff"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request: the message bytes do not decode")
