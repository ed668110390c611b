"""Progress of long work (model build, distillation, benchmarks, sweeps): one helper for all of them.

On a terminal it is a tqdm bar with rate and ETA; anywhere else (a CI log, `make ... | tee`, a file) it is
a log line every `interval_s` seconds and at the end, with the same numbers, so that a slow run still shows
that it moves. Log lines go through :mod:`logging` (the entry points configure it); tqdm writes to stderr.

    with Progress(330, "build: training", unit="step") as bar:
        for ...:
            bar.update(loss=f"{loss:.3f}")

    for prompt in track(prompts, "bench: greedy", unit="prompt"):
        ...
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
LOG = logging.getLogger("eesd.progress")
LOG_INTERVAL_S = 30.0


def format_seconds(seconds: float) -> str:
    """125 -> '02:05', 3725 -> '1:02:05' (tqdm's format, so bars and log lines read alike)."""
    return tqdm.format_interval(seconds)


class Progress:
    """Counts units of work towards `total` (None: unknown). A bar on a terminal, log lines otherwise;
    nothing when `enabled` is False. `initial` counts work done before (a resumed run), which the rate and
    the ETA leave out."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
        interval_s: float = LOG_INTERVAL_S,
        stream: TextIO | None = None,
        logger: logging.Logger = LOG,
    ) -> None:
        stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self._initial, self._interval_s, self._log = initial, interval_s, logger
        self._postfix: dict[str, object] = {}
        self._start = self._last_log = time.monotonic()
        self._logged_count = initial
        self._exits = contextlib.ExitStack()
        self._bar: tqdm | None = None
        self._logging = enabled and not stream.isatty()
        if enabled and stream.isatty():
            # Log records printed while the bar is up go above it instead of through it.
            self._exits.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: object) -> None:
        """n more units done; `postfix` (e.g. loss=...) is shown after the counts until replaced."""
        self.count += n
        self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
        elif self._logging:
            now = time.monotonic()
            # The first update too: the rate of a slow start is what a watcher wants to see early.
            first = self._logged_count == self._initial
            if first or now - self._last_log >= self._interval_s or self.count == self.total:
                self._log_line(now)

    def line(self, now: float | None = None) -> str:
        """'build: training 120/330 step (36%), 4.10 s/step, elapsed 08:12, ETA 14:21, loss=5.31'."""
        now = time.monotonic() if now is None else now
        elapsed, done = now - self._start, self.count - self._initial
        parts = [f"{self.desc} {self.count}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            per = elapsed / done
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if done > 0 and self.total is not None and self.count < self.total:
            parts.append(f"ETA {format_seconds(elapsed / done * (self.total - self.count))}")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def _log_line(self, now: float) -> None:
        self._log.info("%s", self.line(now))
        self._last_log, self._logged_count = now, self.count

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logging and self.count != self._logged_count:
            self._log_line(time.monotonic())  # the final count, also when the work stopped short
        self._logging = False
        self._exits.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", *, enabled: bool = True
) -> Iterator[T]:
    """Yields the items of `iterable`, counting each one as done once the caller asks for the next."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled=enabled) as progress:
        for item in iterable:
            yield item
            progress.update()
