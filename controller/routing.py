"""Routing of sessions to (drafter, verifier) pairs: spread over ready pods, sticky per session.

Discovery says which pods are ready; a node that failed a call is kept out for `down_s` seconds, so a
restarted pod comes back without a discovery event. New sessions go to the least-loaded node.
"""

import time
from collections import Counter
from collections.abc import Callable

from controller.discovery import _Discovery


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
        self._down_until: dict[str, float] = {}

    def _pick(self, discovery: _Discovery, exclude: str = "") -> str | None:
        now = time.monotonic()
        ready = [
            e.address
            for e in discovery.endpoints()
            if e.ready
            and e.address != exclude
            and self._down_until.get(e.address, 0.0) <= now
            and not self.lost(e.address)
        ]
        return min(ready, key=lambda address: (self.load[address], address)) if ready else None

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
