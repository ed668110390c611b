"""The one place where exceptions become gRPC status codes (KServe style).

A domain error (`eesd.errors`) aborts the call with the status its class names and its own message. Any
other exception is a bug or a fault of the machine (a torch RuntimeError, an out-of-memory): the client
gets INTERNAL with a generic message (raw text can leak internals), the log gets the traceback with the
method and session, and eesd:grpc_server_handled_total counts it under code INTERNAL.

The same wrapper watches every call through serving.observability.observed (the rule the HTTP API's requests
follow too): its status and time in the metrics, its span when tracing is on, and the access line of every
call of the controller's public API.
"""

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from eesd.errors import ERRORS, AlreadyExists, EesdError, InvalidArgument, Unavailable
from serving.calls import GrpcCall
from serving.observability import observed

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"
# Trailing metadata naming which peer was unavailable when a node relays its peer's failure (a drafter
# that cannot reach its verifier), so the controller replaces the right node.
UNAVAILABLE_PEER_KEY = "eesd-unavailable-peer"
_LOGGED_ID_CHARS = 64  # a session id in a log line is client-chosen: quoted and truncated
# Status details travel in HTTP/2 trailers (16 KB by default) and may quote client input: bounded here.
MAX_DETAIL_CHARS = 1024


def status_of(error: EesdError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


def error_of(code: grpc.StatusCode | int, message: str) -> EesdError:
    """The domain error a peer's status stands for, so a relayed failure keeps its code."""
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        field, _, detail = message.partition(": ")
        return (AlreadyExists if code == grpc.StatusCode.ALREADY_EXISTS else InvalidArgument)(field, detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(message)
    return next((cls(message) for cls in ERRORS if cls.status == code.name), EesdError(message))


class DomainErrorInterceptor(aio.ServerInterceptor):
    """Wraps every handler so that any exception ends the call with a status; counts every status returned
    (eesd:grpc_server_handled_total)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        decode, encode = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method), decode, encode)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, _decoded), decode, encode
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, _decoded_each), decode, encode
            )
        return handler


@dataclass(frozen=True)
class _Undecodable:
    """Request bytes that are not the method's message: the handler wrapper answers INVALID_ARGUMENT
    (a failing deserializer would end the call as UNKNOWN before any of our code ran)."""

    error: Exception


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError and friends
            return _Undecodable(error)

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"the message bytes do not decode ({type(request.error).__name__})")
    return request


async def _decoded_each(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _fail(call: GrpcCall, context: aio.ServicerContext, error: Exception, request: Any) -> None:
    """Records the status `error` maps to in `call` and sets it on the call, which the handler then ends.
    Not `context.abort`: the AbortError it raises from inside the handler's `except` block chains the
    error, whose traceback keeps every frame of the call (the parsed request with them) alive until the
    cyclic GC runs; refused maximum-size requests then held gigabytes."""
    if isinstance(error, EesdError):
        code, message = status_of(error), _bounded(str(error))
        if isinstance(error, Unavailable) and error.peer:
            context.set_trailing_metadata(((UNAVAILABLE_PEER_KEY, error.peer),))
    else:
        code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    if code == grpc.StatusCode.INTERNAL:
        session_id = str(getattr(request, "session_id", ""))[:_LOGGED_ID_CHARS]
        log.error("%s (session %r) failed", call.method, session_id, exc_info=error)
    call.status = code
    context.set_code(code)
    context.set_details(message)


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_DETAIL_CHARS else message[: MAX_DETAIL_CHARS - 15] + "... (truncated)"


def _wrap_unary(behavior, method: str):
    async def wrapper(request, context):
        with observed(GrpcCall.of(method, context, request)) as call:
            try:
                response = await behavior(_decoded(request), context)
                call.status = grpc.StatusCode.OK
                return response
            except aio.AbortError:  # the handler chose its status itself
                raise
            except Exception as error:
                _fail(call, context, error, request)
            return None

    return wrapper


def _wrap_stream(behavior, method: str, decoded: Callable[[Any], Any]):
    """`decoded` checks the request: a message (`_decoded`) or an iterator of them (`_decoded_each`)."""

    async def wrapper(request, context):
        with observed(GrpcCall.of(method, context, request)) as call:
            try:
                async for response in behavior(decoded(request), context):
                    yield response
                call.status = grpc.StatusCode.OK
            except aio.AbortError:
                raise
            except Exception as error:
                _fail(call, context, error, request)

    return wrapper
