"""Which drafters and verifiers still answer (docs/architecture.md §8.4).

A crashed node fails its calls at once, but a hung one (stopped, swapping, stuck in a call) only stops
answering: its calls would wait for their whole deadline, longer than a round may take. So the
controller probes every node's health every `probe_s`; a node that answered SERVING and then has not
for `lost_s` is lost: the calls in flight to it end with UNAVAILABLE at once (the round loop then moves the
session to another node by the prefill path, with the same output) and routing skips it. The probe that
sees it SERVING again brings it back, within `probe_s` of its recovery.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eesd.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING


class Liveness:
    def __init__(self, channel_of: Callable[[str], grpc.aio.Channel], probe_s: float = 1.0, lost_s: float = 5.0):
        self.channel_of, self.probe_s, self.lost_s = channel_of, probe_s, lost_s
        self._lost: dict[str, asyncio.Event] = {}  # address -> set while the node is lost
        self._probes: dict[str, asyncio.Task] = {}
        self._follow: asyncio.Task | None = None

    def is_lost(self, address: str) -> bool:
        event = self._lost.get(address)
        return event is not None and event.is_set()

    def watch(self, addresses: Iterable[str]) -> None:
        """Probes exactly these addresses from now on."""
        wanted = set(addresses)
        for address in set(self._probes) - wanted:
            self._probes.pop(address).cancel()
            self._lost.pop(address, None)
        for address in wanted - set(self._probes):
            self._lost[address] = asyncio.Event()
            self._probes[address] = asyncio.create_task(self._probe(address))

    def start(self, addresses: Callable[[], Iterable[str]]) -> None:
        """Watches the addresses `addresses()` reports (discovery), read again every probe period."""

        async def follow() -> None:
            while True:
                self.watch(addresses())
                await asyncio.sleep(self.probe_s)

        self._follow = asyncio.create_task(follow())

    async def guard(self, call: Awaitable[T], nodes: dict[str, str]) -> T:
        """`call`'s result, or Unavailable naming the role as soon as one of `nodes` (address -> role) is
        lost; the call is then cancelled."""
        events = {address: self._lost[address] for address in nodes if address in self._lost}
        task = asyncio.ensure_future(call)
        waits = {asyncio.ensure_future(event.wait()): address for address, event in events.items()}
        try:
            done, _ = await asyncio.wait([task, *waits], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled: so is its call
            task.cancel()
            raise
        finally:
            for wait in waits:
                wait.cancel()
        if task in done:
            return task.result()
        task.cancel()
        address = next(waits[wait] for wait in done if wait in waits)
        role = nodes[address]
        raise Unavailable(f"{role} {address} stopped answering health checks for {self.lost_s:g} s", peer=role)

    async def _probe(self, address: str) -> None:
        # Lost means it answered SERVING and then stopped: a node still starting (loading its model, not yet
        # listening) is not lost, so routing does not skip it for the seconds the probes and the channel's
        # reconnect backoff would take to notice it came up. Calls to a node not ready fail fast
        # (UNAVAILABLE) and the round loop routes around it.
        lost, last_serving = self._lost[address], None
        while True:
            started = time.monotonic()
            stub = health_pb2_grpc.HealthStub(self.channel_of(address))  # the channel may have been replaced
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.lost_s)
                serving = reply.status == SERVING
            except grpc.aio.AioRpcError:
                serving = False
            now = time.monotonic()
            if serving:
                last_serving = now
                if lost.is_set():
                    log.warning("node %s answers SERVING again: back in routing", address)
                    lost.clear()
            elif not lost.is_set() and last_serving is not None and now - last_serving >= self.lost_s:
                log.warning("node %s has not answered SERVING for %.1f s: lost", address, now - last_serving)
                lost.set()
            await asyncio.sleep(max(0.0, self.probe_s - (now - started)))

    async def aclose(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
        self.watch(())
