"""Synchronous client of the EESD Serve controller."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Self, TypeVar, Unpack

import grpc

from eesd_client._call import ClientSettings, GenerateAttempts, StreamInfo, require_session_id, trace_metadata
from eesd_client._convert import (
    generate_request_to_proto,
    session_from_proto,
    session_state_from_proto,
)
from eesd_client._stubs import controller_pb2, controller_pb2_grpc
from eesd_client.config import (
    DEFAULT_CHANNEL_OPTIONS,
    DEFAULT_RETRY_POLICY,
    ChannelOptions,
    RetryPolicy,
    TlsConfig,
)
from eesd_client.errors import CancelledError, EesdError, from_rpc_error
from eesd_client.types import (
    GenerateOptions,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SessionInfo,
    SessionState,
)

Response = TypeVar("Response")


StartCall = Callable[[controller_pb2.GenerateRequest, float | None], grpc.Call]


class GenerationStream(StreamInfo):
    """The chunks of one Generate call, as they arrive; `result()` drains the rest into a GenerationResult.

    The call starts on the first iteration. The retry policy's codes (UNAVAILABLE, RESOURCE_EXHAUSTED) are
    retried with backoff; after the first response a failed stream is resumed where it broke, so the
    chunks read as one uninterrupted stream: no token twice, none missing (`resumes` counts the resumes).
    """

    def __init__(self, start: StartCall, attempts: GenerateAttempts) -> None:
        self._start = start
        self._attempts = attempts
        self._call: grpc.Call | None = None
        self._cancel = threading.Event()
        self._failure: EesdError | None = None
        self._chunks = self._run()

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return next(self._chunks)
        except EesdError as error:
            self._failure = error
            raise

    def result(self) -> GenerationResult:
        """Consumes the remaining chunks and returns the whole generation with its final statistics."""
        for _ in self:
            pass
        if self._failure is not None:  # the stream already failed: say why, again
            raise self._failure
        return self._attempts.builder.result()

    def cancel(self) -> None:
        """Abandons the call from this side (thread-safe); a blocked iteration raises CancelledError.

        EesdClient.cancel(session_id) stops the session on the server from anywhere.
        """
        self._attempts.cancelled = True
        self._cancel.set()
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def _run(self) -> Iterator[GenerationChunk]:
        attempts = self._attempts
        while True:
            call = self._call = self._start(*attempts.next_request())
            if attempts.cancelled:  # cancel() raced with the start of this attempt
                call.cancel()
            try:
                for message in call:
                    chunk = attempts.on_message(message)
                    if chunk is not None:
                        yield chunk
                break
            except grpc.RpcError as rpc_error:
                delay = attempts.on_error(rpc_error)
                if delay is None:
                    break
                self._cancel.wait(delay)  # a cancel() during the backoff ends it at once
            finally:
                # Ends the RPC when the consumer stopped early; a no-op on a finished call.
                call.cancel()
        attempts.builder.result()  # a stream that ended without its summary is a ProtocolError


class EesdClient:
    """Blocking client of ControllerService.

    `timeout` is the default deadline in seconds of every call, retries included (None: no deadline); each
    method takes its own `timeout` too. Use as a context manager, or call close().
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        auth_token: str | None = None,
        timeout: float | None = 300.0,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        channel_options: ChannelOptions = DEFAULT_CHANNEL_OPTIONS,
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self._settings = ClientSettings(
            tls=tls,
            auth_token=auth_token,
            timeout=timeout,
            retry=retry,
            channel_options=channel_options,
            rng=rng,
        )
        options = self._settings.grpc_options
        self._channel = (
            grpc.insecure_channel(target, options)
            if tls is None
            else grpc.secure_channel(target, tls.credentials(), options)
        )
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._closed = False

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        traceparent: str | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerationStream:
        """Starts a generation; iterate the returned stream for chunks, or call its result()."""
        request = generate_request_to_proto(GenerationRequest(prompt, **options))
        # The caller's trace (`traceparent`, or OpenTelemetry's current span): every attempt joins it.
        metadata = self._settings.metadata + trace_metadata(traceparent)

        def start(attempt: controller_pb2.GenerateRequest, attempt_timeout: float | None) -> grpc.Call:
            if self._closed:  # a stream resuming after close() stops instead of using the closed channel
                raise CancelledError("the client was closed")
            return self._stub.Generate(attempt, timeout=attempt_timeout, metadata=metadata)

        return GenerationStream(start, self._settings.generate_attempts(request, timeout))

    def generate_text(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        traceparent: str | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult:
        """Generates and waits for the whole result."""
        return self.generate(prompt, timeout=timeout, traceparent=traceparent, **options).result()

    def cancel(self, session_id: str, *, timeout: float | None = None) -> SessionState:
        """Cancels a session; returns its state afterwards (CANCELLED, or how it had already ended)."""
        request = controller_pb2.CancelRequest(session_id=require_session_id(session_id))
        response = self._unary(self._stub.Cancel, request, timeout)
        return session_state_from_proto(response.state)

    def get_session(
        self, session_id: str, *, include_token_ids: bool = False, timeout: float | None = None
    ) -> SessionInfo:
        """Returns a session's state and statistics (and its committed tokens if asked)."""
        request = controller_pb2.GetSessionRequest(
            session_id=require_session_id(session_id), include_token_ids=include_token_ids
        )
        return session_from_proto(self._unary(self._stub.GetSession, request, timeout).session)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, method: Callable[..., Response], request: object, timeout: float | None) -> Response:
        # Cancel and GetSession are idempotent, so any retryable failure may be retried.
        budget = self._settings.budget(timeout)
        while True:
            try:
                return method(request, timeout=budget.start_attempt(), metadata=self._settings.metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                delay = budget.retry_delay(error)
                if delay is None:
                    raise error from rpc_error
                time.sleep(delay)
