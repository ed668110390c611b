"""Connection settings of the client: TLS, retries, channel options."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """TLS (and optionally mutual TLS) settings; PEM bytes. All None means TLS with the system roots."""

    root_certificates: bytes | None = None
    # Client key and certificate chain, for servers that require mutual TLS.
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Name to check the server certificate against when it differs from the target host (e.g. an IP).
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(root_certificates), read(private_key), read(certificate_chain), server_name_override)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for calls that failed with a transient status (`retryable_codes`).

    Before the first response of a Generate call arrived, a failed attempt is retried: as a fresh request,
    or, when the caller chose the session id, as a resume of that session (the server treats a repeated
    request as the same session, so a lost first attempt never turns into ALREADY_EXISTS). After the first
    response, a stream that fails with one of these codes is resumed (`resume`): the same request again
    with the session's id and the number of tokens already received, so the server sends only what the
    client missed. Every attempt that brings new tokens starts the attempt count and the backoff afresh;
    the call's deadline bounds everything, backoff included.
    """

    # Attempts in a row without new tokens, the first included; 1 disables retries and resumes.
    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    # Fraction of each backoff drawn at random, so clients that failed together do not retry together.
    jitter: float = 0.5
    # UNAVAILABLE: no controller or verifier reachable now; RESOURCE_EXHAUSTED: the server's KV memory or
    # queue is full and refused the session before it started. Both may pass on their own.
    # A controller that crashes, is killed or shuts down ends its streams with UNAVAILABLE ("Stream removed",
    # "Cancelling all calls"), so the defaults resume across a controller restart. A proxy that resets
    # streams as CANCELLED or INTERNAL needs those codes added; a call this client cancelled itself, or one
    # on a closed client, is never retried.
    retryable_codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    )
    # Resume a Generate stream that failed after its first response; False raises the error instead.
    resume: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Delay before retry number `retry` (0 for the first retry): in [cap * (1 - jitter), cap]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return cap * (1 - self.jitter * rng.random())


@dataclass(frozen=True)
class ChannelOptions:
    """gRPC channel settings."""

    # Keepalive pings while a call is open detect a dead connection during a long generation. The
    # server must allow pings this often (grpc.http2.min_ping_interval_without_data_ms): EESD's services
    # accept one every 15 s (serving/server.py), so keep this at 15 s or more, or the server answers
    # with GOAWAY too_many_pings.
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    max_send_message_bytes: int = 16 * 1024 * 1024
    max_receive_message_bytes: int = 16 * 1024 * 1024
    # Further raw grpc channel arguments, appended last so they win.
    extra: tuple[tuple[str, int | str], ...] = field(default_factory=tuple)

    def to_grpc(self, tls: TlsConfig | None, user_agent: str) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            # The SDK retries itself (RetryPolicy); grpc's transparent retries would hide attempts.
            ("grpc.enable_retries", 0),
            ("grpc.primary_user_agent", user_agent),
        ]
        if tls is not None and tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", tls.server_name_override))
        return options + list(self.extra)


# Defaults of the clients' keyword arguments (the dataclasses are frozen, so sharing them is safe).
DEFAULT_RETRY_POLICY = RetryPolicy()
DEFAULT_CHANNEL_OPTIONS = ChannelOptions()
