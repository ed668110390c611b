"""TLS channels, the backoff schedule and the per-call budget."""

from __future__ import annotations

import random
import time

import pytest
from client_fakes import CERTS, Server
from eesd_client import (
    DeadlineExceededError,
    EesdClient,
    InvalidArgumentError,
    RetryPolicy,
    TlsConfig,
    UnavailableError,
)
from eesd_client._call import CallBudget
from eesd_client.config import ChannelOptions


def test_mutual_tls(tls_controller: Server) -> None:
    tls = TlsConfig.from_files(CERTS / "ca.pem", CERTS / "client.key", CERTS / "client.pem")
    with EesdClient(tls_controller.address, tls=tls, timeout=10) as client:
        assert client.generate_text("hi", max_new_tokens=2).token_ids == (100, 101)


def test_tls_server_name_override_and_refused_client(tls_controller: Server) -> None:
    port = tls_controller.address.rsplit(":", 1)[1]
    tls = TlsConfig.from_files(CERTS / "ca.pem", CERTS / "client.key", CERTS / "client.pem", "localhost")
    with EesdClient(f"127.0.0.1:{port}", tls=tls, timeout=10) as client:
        assert client.generate_text("hi", max_new_tokens=1).token_ids == (100,)
    # Without a client certificate the handshake fails: UNAVAILABLE, retried, then raised.
    no_cert = TlsConfig.from_files(CERTS / "ca.pem")
    once = RetryPolicy(max_attempts=1)
    with EesdClient(tls_controller.address, tls=no_cert, timeout=10, retry=once) as client:
        with pytest.raises(UnavailableError):
            client.generate_text("hi", max_new_tokens=1)


def test_tls_config_validation() -> None:
    with pytest.raises(ValueError, match="both"):
        TlsConfig(private_key=b"key")


def test_channel_options() -> None:
    tls = TlsConfig(server_name_override="eesd.internal")
    channel = ChannelOptions(keepalive_time_ms=5000, extra=(("grpc.lb_policy_name", "round_robin"),))
    options = dict(channel.to_grpc(tls, "ua"))
    assert options["grpc.keepalive_time_ms"] == 5000
    assert options["grpc.enable_retries"] == 0
    assert options["grpc.ssl_target_name_override"] == "eesd.internal"
    assert options["grpc.lb_policy_name"] == "round_robin"


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=1.0, jitter=0.5)
    rng = random.Random(0)
    for retry, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert all(cap * 0.5 <= d <= cap for d in delays)
        assert max(delays) - min(delays) > cap * 0.3  # jittered, not constant
    assert RetryPolicy(jitter=0.0).backoff_s(1, rng) == pytest.approx(0.2)


def test_budget_stops_at_max_attempts_and_at_the_deadline() -> None:
    unavailable = UnavailableError("down")
    budget = CallBudget(RetryPolicy(max_attempts=3, initial_backoff_s=0.001), None, random.Random(0))
    delays = []
    while True:
        budget.start_attempt()
        delay = budget.retry_delay(unavailable)
        if delay is None:
            break
        delays.append(delay)
    assert budget.attempts == 3 and len(delays) == 2
    assert budget.retry_delay(InvalidArgumentError("bad")) is None

    # A backoff that would outlast the deadline is not taken.
    short = CallBudget(RetryPolicy(initial_backoff_s=10.0), 0.5, random.Random(0))
    assert 0 < short.start_attempt() <= 0.5
    assert short.retry_delay(unavailable) is None

    expired = CallBudget(RetryPolicy(), 0.01, random.Random(0))
    time.sleep(0.02)
    with pytest.raises(DeadlineExceededError):
        expired.start_attempt()


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2.0)
