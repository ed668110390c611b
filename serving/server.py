"""Running a grpc.aio server the same way for every service: authentication and the domain-error
interceptor, TLS (serving/security.py), standard health checking (SERVING only once `warmup` succeeded, also
on a plain-text health port for probes that cannot speak TLS), server reflection, graceful SIGTERM shutdown;
the channel and keepalive settings of every connection between the services."""

import asyncio
import ctypes
import ctypes.util
import faulthandler
import logging
import signal
from collections.abc import Awaitable, Callable

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from eesd.errors import EesdError
from serving.config import SecurityConfig
from serving.errors import DomainErrorInterceptor
from serving.metrics import start_exporter
from serving.security import Peers, Tokens, server_credentials, server_interceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Keepalive, set here for both ends of every connection between the services. A client pings its idle
# connections every KEEPALIVE_TIME_MS, calls open or not, and drops one whose ping is not answered within
# KEEPALIVE_TIMEOUT_MS: a peer that vanished is found in seconds, not at the next call's deadline. A server
# accepts a ping every KEEPALIVE_TIME_MS / 2 even without calls in flight; a client that pings more often
# than the server accepts gets GOAWAY too_many_pings after a few pings (gRPC's defaults accept one every
# 5 minutes, and only during calls, which is why idle connections were dropped with that error). The SDK's
# default (eesd_client.ChannelOptions.keepalive_time_ms, 60 s) is within that too.
# The channel argument of the server's minimum is grpc.http2.min_ping_interval_without_data_ms (C-core's
# GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def client_keepalive(time_ms: int = KEEPALIVE_TIME_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection (default: 2 pings, then none)
    ]


def server_keepalive(time_ms: int = KEEPALIVE_TIME_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", time_ms),  # the server pings its idle clients too (default: every 2 h)
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", time_ms // 2),
        ("grpc.http2.max_ping_strikes", 2),  # pings more often than that: GOAWAY after the third
    ]


CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *client_keepalive(),
    # A peer that was down reconnects within a second or two of coming back (gRPC's default backoff grows
    # to 120 s, so a node down for minutes was not used again for most of a minute after its restart).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 256 * 1024


def return_large_allocations() -> None:
    """Makes glibc serve every allocation of 256 KiB or more (request and response buffers) with its own
    mapping, given back to the system when freed. By default the threshold rises to the size of the largest
    block freed so far, so after a few large requests their buffers come from the heap, which keeps them:
    100 refused 16.8 MB requests left a controller at 176 MB (baseline 60), 75 to 90 MB with this. A no-op where
    the C library is not glibc."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def channel(address: str, peers: Peers | None = None) -> aio.Channel:
    """A channel to a drafter or verifier: TLS and the internal token as `peers` says (plain text without)."""
    return (peers or Peers()).channel(address, CHANNEL_OPTIONS)


def server_options(max_receive_bytes: int = MAX_MESSAGE_BYTES, keepalive_ms: int = KEEPALIVE_TIME_MS) -> list:
    receive = "grpc.max_receive_message_length"
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        (receive, max_receive_bytes),
        *server_keepalive(keepalive_ms),
        # gRPC binds with SO_REUSEPORT by default: a second server on a port in use would start too and take
        # half of its connections. Without it, that server fails to start.
        ("grpc.so_reuseport", 0),
    ]


async def serve(
    name: str,
    address: str,
    register: Callable[[aio.Server], list[str]],
    warmup: Callable[[], Awaitable[None]],
    grace_s: float = 10.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int = 0,
    stalled: Callable[[], bool] = lambda: False,
    drain: Callable[[], None] = lambda: None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
    security: SecurityConfig | None = None,
    tokens: Tokens | None = None,
    token_kind: str = "bearer token",
) -> None:
    """Serves until SIGTERM/SIGINT. `register` adds the servicers and returns their full service names.
    With `metrics_port` > 0, Prometheus /metrics is served over HTTP on it (same host). While `stalled()`
    says the process makes no progress, health answers NOT_SERVING (so liveness probes see it). On SIGTERM,
    `drain()` asks long-lived streams to end once their work in flight is done. A request larger than
    `max_receive_bytes` is refused (RESOURCE_EXHAUSTED) before it is parsed. `security` sets TLS, the
    client-certificate names and the plain-text health port; calls must carry one of `tokens` (a
    `token_kind`), health checks and reflection excepted."""
    return_large_allocations()
    faulthandler.enable()  # a native crash (or a fatal signal) leaves its traceback in the log
    security = security or SecurityConfig()
    host = address.rpartition(":")[0]
    start_exporter(metrics_port, host.strip("[]") or "0.0.0.0")
    auth = server_interceptor(security, tokens, token_kind)
    interceptors = [*([auth] if auth else []), DomainErrorInterceptor()]
    server = aio.server(interceptors=interceptors, options=server_options(max_receive_bytes))
    services = register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    probes = None
    if security.health_port:  # the same health states, in plain text, and nothing else
        probes = aio.server(options=server_options(64 * 1024))
        health_pb2_grpc.add_HealthServicer_to_server(health, probes)
        probes.add_insecure_port(f"{host}:{security.health_port}")
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    for service in ("", *services):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = server_credentials(security)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    if probes is not None:
        await probes.start()
    log.info(
        "%s listening on %s (port %d, %s%s%s); warming up",
        name,
        address,
        port,
        "plain text" if credentials is None else "TLS" + (", client certificates required" * security.tls_client_auth),
        f", {token_kind}s required" if tokens else "",
        f", health in plain text on port {security.health_port}" if probes is not None else "",
    )
    try:
        await warmup()
    except BaseException:
        await server.stop(0)
        if probes is not None:
            await probes.stop(0)
        raise
    for service in ("", *services):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s SERVING", name)
    watchdog = asyncio.create_task(watch_progress(name, health, ("", *services), stalled))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Readiness drops first so routing stops; in-flight rounds get the grace period to finish.
    log.info("%s draining for up to %.0f s", name, grace_s)
    watchdog.cancel()
    await health.enter_graceful_shutdown()
    drain()
    await server.stop(grace_s)
    if probes is not None:
        await probes.stop(0)
    if on_stop is not None:
        await on_stop()
    log.info("%s stopped", name)


def run_service(name: str, main: Callable[[], Awaitable[None]]) -> None:
    """Runs a service's `main` to its end. A domain error that keeps it from starting (a bad setting, a model
    that cannot be found or loaded) ends the process with status 2 and one log line that names the cause,
    not a traceback."""
    try:
        asyncio.run(main())
    except EesdError as error:
        log.error("%s did not start: %s", name, error)
        raise SystemExit(2) from None


async def watch_progress(
    name: str, health: HealthServicer, services: tuple[str, ...], stalled: Callable[[], bool], period_s: float = 1.0
) -> None:
    """Health follows progress: NOT_SERVING while `stalled()`, SERVING again once it is not."""
    serving = True
    while True:
        await asyncio.sleep(period_s)
        if stalled() == serving:
            serving = not serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            log.warning("%s %s", name, "makes progress again: SERVING" if serving else "is stalled: NOT_SERVING")
            for service in services:
                await health.set(service, status)
