"""serving/security.py on real grpc.aio servers on loopback: tokens (lists, files, rotation, constant-time
comparison), the authentication interceptor (UNAUTHENTICATED before parsing, health and reflection open),
TLS and mutual TLS with certificates made here, a certificate renewed under a running server, and keepalive
settings that let an idle connection ping without GOAWAY."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from serving.config import SecurityConfig, check_fields
from serving.errors import DomainErrorInterceptor
from serving.security import Peers, Tokens, bearer_of, server_credentials, server_interceptor
from serving.server import CHANNEL_OPTIONS, client_keepalive, server_keepalive, server_options
from tests.tls import SERVICE_NAME, make_pki

SERVICE = "eesd.test.Echo"


def echo_handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(requests, context):
        async for request in requests:
            yield request

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


async def start_server(config: SecurityConfig, tokens: Tokens | None) -> tuple[aio.Server, str]:
    auth = server_interceptor(config, tokens)
    server = aio.server(interceptors=[*([auth] if auth else []), DomainErrorInterceptor()], options=server_options())
    server.add_generic_rpc_handlers([echo_handlers()])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    credentials = server_credentials(config)
    address = "127.0.0.1:0"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def unary(channel: aio.Channel, payload: bytes = b"hi", metadata=()) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/Unary")(payload, metadata=metadata, timeout=5)


async def health(channel: aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def test_tokens_list_file_and_rotation(tmp_path) -> None:
    assert not Tokens()
    tokens = Tokens("new, old")
    assert tokens.first() == "new"
    assert tokens.accepts("new") and tokens.accepts("old")
    assert not tokens.accepts("") and not tokens.accepts("ne") and not tokens.accepts("new,old")

    path = tmp_path / "tokens"
    path.write_text("a-token\n\nb-token\n")
    from_file = Tokens(file=str(path))
    assert from_file.first() == "a-token" and from_file.accepts("b-token")
    # Rotation: the file changes (a Secret update); the next check reads it again.
    path.write_text("c-token\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    from_file._file._checked = -1e9  # no need to wait out the 1 s between checks
    assert from_file.accepts("c-token") and not from_file.accepts("a-token")
    assert from_file.first() == "c-token"


def test_bearer_of() -> None:
    assert bearer_of((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_of((("authorization", "bearer abc"),)) == "abc"
    assert bearer_of((("authorization", "Basic abc"),)) == ""
    assert bearer_of(()) == "" and bearer_of(None) == ""


def test_config_checks(tmp_path) -> None:
    from eesd.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="tls_key_file"):
        check_fields(SecurityConfig(tls_cert_file="x"))
    with pytest.raises(InvalidArgument, match="tls_client_auth"):
        check_fields(SecurityConfig(tls_client_auth=True))
    with pytest.raises(InvalidArgument, match="no such file"):
        SecurityConfig(tls_cert_file=str(tmp_path / "no"), tls_key_file=str(tmp_path / "no")).validate_security()


def test_tokens_refuse_before_parsing_and_leave_health_open() -> None:
    async def main() -> None:
        server, address = await start_server(SecurityConfig(), Tokens("current,previous"))
        try:
            async with aio.insecure_channel(address) as channel:
                for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "current"),)):
                    with pytest.raises(aio.AioRpcError) as refused:
                        await unary(channel, metadata=metadata)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # A streaming call is refused as well, before it reads a message.
                call = channel.stream_stream(f"/{SERVICE}/Stream")(timeout=5)
                await call.write(b"x")
                with pytest.raises(aio.AioRpcError) as refused:
                    await call.read()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
                for token in ("current", "previous"):
                    assert await unary(channel, metadata=(("authorization", f"Bearer {token}"),)) == b"hi"
            # Peers sends the first token on every call, streams included.
            peers = Peers(tokens=Tokens("current"))
            async with peers.channel(address, CHANNEL_OPTIONS) as channel:
                assert await unary(channel) == b"hi"
                call = channel.stream_stream(f"/{SERVICE}/Stream")(timeout=5)
                for message in (b"a", b"b"):
                    await call.write(message)
                    assert await call.read() == message
                await call.done_writing()
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_tls_and_mutual_tls(tmp_path) -> None:
    pki = make_pki(tmp_path)
    config = SecurityConfig(
        tls_cert_file=str(pki.service_cert),
        tls_key_file=str(pki.service_key),
        tls_ca_file=str(pki.ca),
        tls_client_auth=True,
        tls_client_names=SERVICE_NAME,
    )
    config.validate_security()
    trusted = Peers(tls=True, ca_file=str(pki.ca), server_name=SERVICE_NAME)

    async def main() -> None:
        server, address = await start_server(config, None)
        try:
            # Plain text to a TLS port: no connection.
            async with aio.insecure_channel(address) as channel:
                with pytest.raises(aio.AioRpcError) as plain:
                    await health(channel)
                assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
            # TLS without a client certificate, or with one of another CA: the handshake fails.
            foreign = dataclasses.replace(trusted, cert_file=str(pki.foreign_cert), key_file=str(pki.foreign_key))
            for peers in (trusted, foreign):
                async with peers.channel(address, CHANNEL_OPTIONS) as channel:
                    with pytest.raises(aio.AioRpcError) as refused:
                        await health(channel)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # A certificate of the CA that names another caller: UNAUTHENTICATED, health still open.
            other = dataclasses.replace(trusted, cert_file=str(pki.client_cert), key_file=str(pki.client_key))
            async with other.channel(address, CHANNEL_OPTIONS) as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(aio.AioRpcError) as wrong:
                    await unary(channel)
                assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The service's own certificate (what the controller and the drafters present) is accepted.
            own = dataclasses.replace(trusted, cert_file=str(pki.service_cert), key_file=str(pki.service_key))
            async with own.channel(address, CHANNEL_OPTIONS) as channel:
                assert await unary(channel) == b"hi"
            # A client that checks another name refuses the server.
            wrong_name = dataclasses.replace(own, server_name="someone-else")
            async with wrong_name.channel(address, CHANNEL_OPTIONS) as channel:
                with pytest.raises(aio.AioRpcError):
                    await unary(channel)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path) -> None:
    """The files change under the running server (as a Secret update does): new connections get the new
    certificate, here one of another CA, which only a client trusting that CA accepts."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old.service_cert, cert)
    shutil.copy(old.service_key, key)
    config = SecurityConfig(tls_cert_file=str(cert), tls_key_file=str(key))

    async def main() -> None:
        server, address = await start_server(config, None)
        try:
            for pki, served in ((old, True), (new, False)):
                peers = Peers(tls=True, ca_file=str(pki.ca), server_name=SERVICE_NAME)
                async with peers.channel(address, CHANNEL_OPTIONS) as channel:
                    if served:
                        assert await unary(channel) == b"hi"
                    else:
                        with pytest.raises(aio.AioRpcError):
                            await unary(channel)
            # Replace both files the way a Secret volume does (new files, renamed over the old ones).
            for source, target in ((new.service_cert, cert), (new.service_key, key)):
                shutil.copy(source, f"{target}.new")
                os.replace(f"{target}.new", target)
            await asyncio.sleep(1.1)  # the files are looked at once a second at most
            peers = Peers(tls=True, ca_file=str(new.ca), server_name=SERVICE_NAME)
            async with peers.channel(address, CHANNEL_OPTIONS) as channel:
                assert await unary(channel) == b"hi"
        finally:
            await server.stop(0)

    asyncio.run(main())


def idle_channel_states(server_args: list, keepalive_ms: int, idle_s: float) -> list[str]:
    """Connectivity states of a channel that made one call and then idled with keepalive pings."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_args)
    from grpc_health.v1.health import HealthServicer as SyncHealth

    health_pb2_grpc.add_HealthServicer_to_server(SyncHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    states: list[str] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=client_keepalive(keepalive_ms)) as channel:
            channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            time.sleep(idle_s)
    finally:
        server.stop(0)
    return states


def test_idle_clients_with_keepalive_get_no_goaway() -> None:
    """The same keepalive settings on both ends (scaled down to a 1 s ping): the idle connection stays READY.
    Against a server with gRPC's defaults, the same client is sent GOAWAY too_many_pings within seconds and
    its channel falls back to IDLE."""
    keepalive_ms, idle_s = 1000, 4.5
    results: dict[str, list[str]] = {}

    def run(name: str, server_args: list) -> None:
        results[name] = idle_channel_states(server_args, keepalive_ms, idle_s)

    threads = [
        threading.Thread(target=run, args=("ours", server_keepalive(keepalive_ms))),
        threading.Thread(target=run, args=("defaults", [])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["ours"][-1] == "READY" and "IDLE" not in results["ours"][results["ours"].index("READY") :]
    assert results["defaults"][-1] == "IDLE", results["defaults"]  # the check above can see a GOAWAY
    assert (
        dict(server_options())["grpc.http2.min_ping_interval_without_data_ms"]
        <= dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"]
    )


def test_internal_clients_present_a_renewed_certificate_without_a_restart(tmp_path) -> None:
    """The controller's node channels (NodeClients) follow the certificate files: once they change, new
    channels present the new client certificate, and the old channels are closed."""
    from controller.nodes import NodeClients

    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    server_config = SecurityConfig(
        tls_cert_file=str(new.service_cert),
        tls_key_file=str(new.service_key),
        tls_ca_file=str(new.ca),  # only the new CA's clients get in
        tls_client_auth=True,
    )
    ca, cert, key = tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.write_bytes(new.ca.read_bytes())
    shutil.copy(old.service_cert, cert)
    shutil.copy(old.service_key, key)
    peers = Peers(True, str(ca), str(cert), str(key), SERVICE_NAME)

    async def main() -> None:
        server, address = await start_server(server_config, None)
        nodes = NodeClients(timeout_s=5, peers=peers)
        try:
            first = nodes._channel(address)
            with pytest.raises(aio.AioRpcError):  # the old CA's certificate: refused
                await health(first)
            for source, target in ((new.service_cert, cert), (new.service_key, key)):
                shutil.copy(source, f"{target}.new")
                os.replace(f"{target}.new", target)
            await asyncio.sleep(1.1)
            renewed = nodes._channel(address)
            assert renewed is not first
            assert await health(renewed) == health_pb2.HealthCheckResponse.SERVING
            assert nodes._channel(address) is renewed  # one new channel per address, kept
            await asyncio.sleep(0.1)
            assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        finally:
            await nodes.close()
            await server.stop(0)

    asyncio.run(main())
