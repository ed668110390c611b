"""Typed exceptions of the client SDK, one per gRPC status code the controller uses."""

from __future__ import annotations

import grpc
import grpc.aio


class EesdError(Exception):
    """Base of every error the client raises; `code` is the gRPC status code (None for client-side errors)."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.code is not None else self.message


class InvalidArgumentError(EesdError):
    """The request is malformed (raised client-side too, before anything is sent)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(EesdError):
    """The session does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(EesdError):
    """The client-chosen session id is already in use."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(EesdError):
    """The server cannot serve the request in its current state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(EesdError):
    """The caller is authenticated but not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(EesdError):
    """The bearer token is missing or invalid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(EesdError):
    """No capacity left (sessions, KV cache) or a message exceeded the size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(EesdError):
    """The server cannot be reached; retried, and a broken Generate stream resumed, automatically."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(EesdError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(EesdError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class InternalError(EesdError):
    """The server failed."""

    code = grpc.StatusCode.INTERNAL


class ProtocolError(EesdError):
    """The server broke the protocol, e.g. a Generate stream ended without its summary."""


_BY_CODE: dict[grpc.StatusCode, type[EesdError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
    )
    if cls.code is not None
}


def from_rpc_error(error: grpc.RpcError) -> EesdError:
    """Maps a failed call (sync or asyncio) to the typed error of its status code."""
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code, details = error.code(), error.details() or ""
    else:  # a bare RpcError carries no status; keep its text
        code, details = grpc.StatusCode.UNKNOWN, str(error)
    return _BY_CODE.get(code, EesdError)(details or code.name, code=code)
