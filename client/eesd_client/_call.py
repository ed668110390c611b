"""Per-call plumbing shared by the sync and asyncio clients: deadlines, retry accounting, metadata."""

from __future__ import annotations

import random
import time

from eesd_client._version import __version__
from eesd_client.config import ChannelOptions, RetryPolicy, TlsConfig
from eesd_client.errors import DeadlineExceededError, EesdError, InvalidArgumentError

Metadata = tuple[tuple[str, str], ...]


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
    """

    def __init__(self, policy: RetryPolicy, timeout_s: float | None, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.attempts = 0

    def start_attempt(self) -> float | None:
        """Counts an attempt and returns its timeout in seconds (None: no deadline)."""
        self.attempts += 1
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("deadline exceeded before the call could be attempted")
        return left

    def retry_delay(self, error: EesdError) -> float | None:
        """Seconds to wait before the next attempt, or None when the error must be raised."""
        if error.code not in self._policy.retryable_codes or self.attempts >= self._policy.max_attempts:
            return None
        delay = self._policy.backoff_s(self.attempts - 1, self._rng)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay


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


def require_session_id(session_id: str) -> str:
    if not session_id:
        raise InvalidArgumentError("session_id is empty")
    return session_id
