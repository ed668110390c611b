"""Running a grpc.aio server the same way for every service: the domain-error interceptor, standard
health checking (SERVING only once `warmup` succeeded), server reflection, graceful SIGTERM shutdown."""

import asyncio
import ctypes
import ctypes.util
import logging
import signal
from collections.abc import Awaitable, Callable

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from serving.errors import DomainErrorInterceptor
from serving.metrics import start_exporter

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
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


def channel(address: str) -> aio.Channel:
    """Insecure loopback/cluster-internal channel; services talk inside the release's NetworkPolicy."""
    return aio.insecure_channel(address, options=CHANNEL_OPTIONS)


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
) -> None:
    """Serves until SIGTERM/SIGINT. `register` adds the servicers and returns their full service names.
    With `metrics_port` > 0, Prometheus /metrics is served over HTTP on it (same host). While `stalled()`
    says the process makes no progress, health answers NOT_SERVING (so liveness probes see it). On SIGTERM,
    `drain()` asks long-lived streams to end once their work in flight is done. A request larger than
    `max_receive_bytes` is refused (RESOURCE_EXHAUSTED) before it is parsed."""
    return_large_allocations()
    start_exporter(metrics_port, address.rpartition(":")[0].strip("[]") or "0.0.0.0")
    receive = "grpc.max_receive_message_length"
    options = [*(o for o in CHANNEL_OPTIONS if o[0] != receive), (receive, max_receive_bytes)]
    # gRPC binds with SO_REUSEPORT by default: a second server on a port in use would start too and take
    # half of its connections. Without it, that server fails to start.
    options.append(("grpc.so_reuseport", 0))
    server = aio.server(interceptors=[DomainErrorInterceptor()], options=options)
    services = register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    for service in ("", *services):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(address)
    await server.start()
    log.info("%s listening on %s (port %d); warming up", name, address, port)
    try:
        await warmup()
    except BaseException:
        await server.stop(0)
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
    if on_stop is not None:
        await on_stop()
    log.info("%s stopped", name)


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
