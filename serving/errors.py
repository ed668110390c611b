"""The one place where domain errors become gRPC status codes (KServe style)."""

import logging

import grpc
from grpc import aio

from eesd.errors import (
    AlreadyExists,
    EesdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from serving.metrics import rpc_metrics

log = logging.getLogger(__name__)

STATUS_OF = (  # most specific first: RollbackError is a FailedPrecondition, AlreadyExists an InvalidArgument
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_of(error: EesdError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


class DomainErrorInterceptor(aio.ServerInterceptor):
    """Wraps every handler so an EesdError aborts the call with its status code and message; counts every
    status returned (eesd:grpc_server_handled_total)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer
            )
        return handler


# Trailing metadata naming which peer was unavailable when a node relays its peer's failure (a drafter
# that cannot reach its verifier), so the controller replaces the right node.
UNAVAILABLE_PEER_KEY = "eesd-unavailable-peer"


async def _abort(context: aio.ServicerContext, error: EesdError) -> None:
    code = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected domain error")
    if isinstance(error, Unavailable) and error.peer:
        context.set_trailing_metadata(((UNAVAILABLE_PEER_KEY, error.peer),))
    await context.abort(code, str(error))


def _wrap_unary(behavior, method: str):
    async def wrapper(request, context):
        with rpc_metrics().call(method) as status:
            try:
                response = await behavior(request, context)
                status[0] = grpc.StatusCode.OK
                return response
            except EesdError as error:
                status[0] = status_of(error)
                await _abort(context, error)

    return wrapper


def _wrap_stream(behavior, method: str):
    async def wrapper(request, context):
        with rpc_metrics().call(method) as status:
            try:
                async for response in behavior(request, context):
                    yield response
                status[0] = grpc.StatusCode.OK
            except EesdError as error:
                status[0] = status_of(error)
                await _abort(context, error)

    return wrapper


def error_of(code: grpc.StatusCode | int, message: str) -> EesdError:
    """The domain error a peer's status stands for, so a relayed failure keeps its code."""
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        field, _, detail = message.partition(": ")
        return (AlreadyExists if code == grpc.StatusCode.ALREADY_EXISTS else InvalidArgument)(field, detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(message)
    return next((cls(message) for cls, c in STATUS_OF if c == code), EesdError(message))
