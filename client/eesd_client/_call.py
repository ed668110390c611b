"""Per-call plumbing shared by the sync and asyncio clients: deadlines, retry accounting, metadata."""

from __future__ import annotations

import functools
import random
import re
import time
from collections.abc import Callable

import grpc

from eesd_client._convert import ResultBuilder
from eesd_client._stubs import controller_pb2
from eesd_client._version import __version__
from eesd_client.config import ChannelOptions, RetryPolicy, TlsConfig
from eesd_client.errors import (
    CancelledError,
    DeadlineExceededError,
    EesdError,
    InvalidArgumentError,
    from_rpc_error,
)
from eesd_client.types import GenerationChunk

Metadata = tuple[tuple[str, str], ...]


# W3C Trace Context (version 00 and later): version-trace_id-parent_id-flags, lowercase hex.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@functools.cache
def _opentelemetry_inject() -> Callable[[dict[str, str]], None] | None:
    """opentelemetry's propagate.inject when the caller's process has OpenTelemetry, else None."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return None
    return inject


def trace_metadata(traceparent: str | None) -> Metadata:
    """The call's W3C trace context, so that the server's spans join the caller's trace: `traceparent` as
    given, else the current OpenTelemetry span's (with its tracestate) when OpenTelemetry is installed and
    a span is current; nothing otherwise."""
    if traceparent is not None:
        if not _TRACEPARENT.fullmatch(traceparent) or traceparent.startswith("ff"):
            raise InvalidArgumentError(f"traceparent is not a W3C traceparent: {traceparent[:64]!r}")
        return (("traceparent", traceparent),)
    inject = _opentelemetry_inject()
    if inject is None:
        return ()
    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple((key, carrier[key]) for key in ("traceparent", "tracestate") if carrier.get(key))


def auth_metadata(token: str | None) -> Metadata:
    """The `authorization: Bearer <token>` header, or nothing without a token."""
    if token is None:
        return ()
    if not token or token != token.strip() or any(c in token for c in "\r\n"):
        raise InvalidArgumentError("auth token must be non-empty, without surrounding whitespace or newlines")
    return (("authorization", f"Bearer {token}"),)


class CallBudget:
    """Deadline and attempt count of one logical call, shared by all its attempts.

    The deadline covers the whole call, retries and backoff included: each attempt gets the time left.
    `max_attempts` bounds the attempts in a row that made no progress (see `progressed`).
    """

    def __init__(self, policy: RetryPolicy, timeout_s: float | None, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.attempts = 0
        # Attempts since the last one that made progress, the current one included.
        self._tries = 0

    def start_attempt(self) -> float | None:
        """Counts an attempt and returns its timeout in seconds (None: no deadline)."""
        self.attempts += 1
        self._tries += 1
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("deadline exceeded before the call could be attempted")
        return left

    def progressed(self) -> None:
        """The current attempt brought something new: the attempt count and the backoff start again."""
        self._tries = 1

    def retry_delay(self, error: EesdError) -> float | None:
        """Seconds to wait before the next attempt, or None when the error must be raised."""
        if error.code not in self._policy.retryable_codes or self._tries >= self._policy.max_attempts:
            return None
        delay = self._policy.backoff_s(self._tries - 1, self._rng)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay


class GenerateAttempts:
    """The retry and resume rule of one Generate call, shared by the sync and asyncio streams (no I/O).

    Each attempt sends `next_request()`; its messages go through `on_message`, its failure through
    `on_error`, which says how long to wait before the next attempt or raises. A stream that broke after
    its first message is resumed: the same request with the session's id and `received_tokens` = the
    tokens already yielded; the server answers with one catch-up chunk holding the tokens committed
    after those (empty when nothing was missed: not yielded), then the rest. A retry before any message
    is a resume too when the caller chose the session id, else a fresh request.
    """

    def __init__(self, request: controller_pb2.GenerateRequest, budget: CallBudget, policy: RetryPolicy) -> None:
        self._request = request
        self._budget = budget
        self._resume = policy.resume
        self.builder = ResultBuilder(request.session_id or None, request.HasField("top_logprobs"))
        # Requests that continued the session after its stream broke mid-way.
        self.resumes = 0
        self.cancelled = False
        # The next message is the first one of a request that resumed the session.
        self._catch_up = False

    @property
    def attempts(self) -> int:
        return self._budget.attempts

    def next_request(self) -> tuple[controller_pb2.GenerateRequest, float | None]:
        """The request of the next attempt and its timeout; raises when cancelled or out of time."""
        if self.cancelled:
            raise CancelledError("generation cancelled by the client")
        timeout = self._budget.start_attempt()
        session_id = self.builder.session_id or self._request.session_id
        if self._budget.attempts == 1 or not session_id:
            return self._request, timeout
        if self.builder.streamed:
            self.resumes += 1
        request = controller_pb2.GenerateRequest()
        request.CopyFrom(self._request)
        request.session_id = session_id
        request.received_tokens = self.builder.completion_tokens
        self._catch_up = True
        return request, timeout

    def on_message(self, message: controller_pb2.GenerateResponse) -> GenerationChunk | None:
        """The chunk to yield for a message of the current attempt, or None (summary, empty catch-up)."""
        catch_up, self._catch_up = self._catch_up, False
        before = self.builder.completion_tokens
        chunk = self.builder.add(message, catch_up=catch_up)
        if self.builder.completion_tokens > before or self.builder.done:
            self._budget.progressed()
        return chunk

    def on_error(self, rpc_error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, None when the call is complete; else raises."""
        if self.cancelled:
            raise CancelledError("generation cancelled by the client") from rpc_error
        if self.builder.done:  # the summary, the last message, arrived: nothing was lost
            return None
        error = from_rpc_error(rpc_error)
        # After the first message only a resume (by the session id the messages carry) continues the call.
        resumable = not self.builder.streamed or (self._resume and bool(self.builder.session_id))
        delay = self._budget.retry_delay(error) if resumable else None
        if delay is None:
            raise error from rpc_error
        return delay


class StreamInfo:
    """Observability of a Generate stream, common to GenerationStream and AsyncGenerationStream."""

    _attempts: GenerateAttempts

    @property
    def session_id(self) -> str | None:
        """The session's id: the one the caller chose, else known once the first message arrived."""
        return self._attempts.builder.session_id

    @property
    def attempts(self) -> int:
        """Calls made so far (1 + retries + resumes)."""
        return self._attempts.attempts

    @property
    def resumes(self) -> int:
        """Calls that resumed the session after its stream broke mid-way (a subset of `attempts`)."""
        return self._attempts.resumes


class ClientSettings:
    """What EesdClient and AsyncEesdClient share: metadata, channel options, deadlines, retries."""

    def __init__(
        self,
        *,
        tls: TlsConfig | None,
        auth_token: str | None,
        timeout: float | None,
        retry: RetryPolicy,
        channel_options: ChannelOptions,
        rng: random.Random | None,
    ) -> None:
        self.metadata = auth_metadata(auth_token)
        self.grpc_options = channel_options.to_grpc(tls, f"eesd-client/{__version__}")
        self._timeout = timeout
        self._retry = retry
        # One generator per client: jitter only has to differ between clients, not be secret.
        self._rng = rng or random.Random()

    def budget(self, timeout: float | None) -> CallBudget:
        """A fresh budget for one call; `timeout` None means the client's default."""
        return CallBudget(self._retry, self._timeout if timeout is None else timeout, self._rng)

    def generate_attempts(self, request: controller_pb2.GenerateRequest, timeout: float | None) -> GenerateAttempts:
        """The retry and resume state of one Generate call."""
        return GenerateAttempts(request, self.budget(timeout), self._retry)


def require_session_id(session_id: str) -> str:
    if not session_id:
        raise InvalidArgumentError("session_id is empty")
    return session_id
