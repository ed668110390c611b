"""Fixtures: a real gRPC ControllerService on loopback, backed by client_fakes.FakeController."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]  # client_fakes needs it on sys.path first
# The SDK is its own package under client/ (installed separately by users); tests import it from source.
for path in (ROOT, ROOT / "client"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from client_fakes import CERTS, FakeController, Server  # noqa: E402

from eesd_proto.eesd.v1 import controller_pb2_grpc  # noqa: E402


def _serve(port_for: Callable[[grpc.Server], int]) -> Iterator[Server]:
    fake = FakeController()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(fake, server)
    port = port_for(server)
    server.start()
    try:
        yield Server(fake, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)


@pytest.fixture
def controller() -> Iterator[Server]:
    """A plaintext server on a free loopback port."""
    yield from _serve(lambda server: server.add_insecure_port("127.0.0.1:0"))


@pytest.fixture
def tls_controller() -> Iterator[Server]:
    """A mutual-TLS server (test CA) on a free loopback port."""
    credentials = grpc.ssl_server_credentials(
        [((CERTS / "server.key").read_bytes(), (CERTS / "server.pem").read_bytes())],
        root_certificates=(CERTS / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    yield from _serve(lambda server: server.add_secure_port("127.0.0.1:0", credentials))
