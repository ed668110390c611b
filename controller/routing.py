"""Routing of sessions to (drafter, verifier) pairs: spread over ready pods, sticky per session.

Discovery says which pods are ready; a node that failed a call is kept out for `down_s` seconds, so a
restarted pod comes back without a discovery event. New sessions go to the least-loaded node, counting
every controller's sessions: this controller's own exactly (`load`), the other replicas' from the state
store (`share_load` reads the route index, `count_routes`, every `SHARED_LOAD_EVERY_S`; sessions not
written for `SHARED_LOAD_WRITTEN_WITHIN_S`, e.g. of a controller that died, stop counting).
"""

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable

from controller.discovery import _Discovery
from eesd.errors import EesdError
from serving.metrics import controller_metrics

log = logging.getLogger(__name__)

SHARED_LOAD_EVERY_S = 1.0
SHARED_LOAD_WRITTEN_WITHIN_S = 120.0  # a live session writes at every round; a controller's crash stops that


class Router:
    def __init__(
        self,
        drafters: _Discovery,
        verifiers: _Discovery,
        down_s: float = 5.0,
        lost: Callable[[str], bool] = lambda address: False,
    ):
        self.drafters, self.verifiers, self.down_s = drafters, verifiers, down_s
        self.lost = lost  # whether a node stopped answering health probes (controller.liveness)
        self.load: Counter[str] = Counter()  # sessions this controller has routed to each node
        self.others: dict[str, int] = {}  # the other controllers' sessions per node, as the store last said
        self._down_until: dict[str, float] = {}
        for role in ("drafter", "verifier"):
            controller_metrics().watch_nodes_ready(role, functools.partial(self.ready_count, role))

    def _ready(self, discovery: _Discovery, exclude: str = "") -> list[str]:
        """The nodes a session may go to: discovered ready, not kept out after a failure, answering probes."""
        now = time.monotonic()
        return [
            e.address
            for e in discovery.endpoints()
            if e.ready
            and e.address != exclude
            and self._down_until.get(e.address, 0.0) <= now
            and not self.lost(e.address)
        ]

    def _pick(self, discovery: _Discovery, exclude: str = "") -> str | None:
        ready = self._ready(discovery, exclude)
        return min(ready, key=lambda address: (self.total_load(address), address)) if ready else None

    def ready_count(self, role: str) -> int:
        """How many drafters or verifiers (`role`) sessions may go to now (eesd:nodes_ready)."""
        return len(self._ready(self.drafters if role == "drafter" else self.verifiers))

    def total_load(self, address: str) -> int:
        """Sessions on the node: this controller's, plus the other controllers' as last read from the store."""
        return self.load[address] + self.others.get(address, 0)

    def update_shared(self, stored: dict[str, int], own: Counter[str]) -> None:
        """Takes the store's sessions per node (every controller's) read while this one had `own` of them:
        the difference is the other controllers' load."""
        self.others = {address: n - own[address] for address, n in stored.items() if n > own[address]}

    async def share_load(self, store, every_s: float = SHARED_LOAD_EVERY_S) -> None:
        """Runs until cancelled: keeps `others` current from the store's route index. While the store does
        not answer, the last counts stay (routing goes on with them)."""
        while True:
            own = Counter(self.load)
            try:
                self.update_shared(await store.count_routes(SHARED_LOAD_WRITTEN_WITHIN_S), own)
            except EesdError as error:
                log.debug("shared load not refreshed: %s", error)
            await asyncio.sleep(every_s)

    def addresses(self) -> list[str]:
        """Every drafter and verifier discovery reports (ready or not)."""
        return [e.address for discovery in (self.drafters, self.verifiers) for e in discovery.endpoints()]

    def pick_drafter(self, exclude: str = "") -> str | None:
        return self._pick(self.drafters, exclude)

    def pick_verifier(self, exclude: str = "") -> str | None:
        return self._pick(self.verifiers, exclude)

    def mark_down(self, address: str) -> None:
        self._down_until[address] = time.monotonic() + self.down_s

    def is_up(self, address: str) -> bool:
        return self._down_until.get(address, 0.0) <= time.monotonic()

    def acquire(self, *addresses: str) -> None:
        for address in addresses:
            if address:
                self.load[address] += 1

    def release(self, *addresses: str) -> None:
        for address in addresses:
            if address:
                self.load[address] -= 1

    def start(self) -> None:
        self.drafters.start()
        self.verifiers.start()

    def stop(self) -> None:
        self.drafters.stop()
        self.verifiers.stop()
