"""eesd.progress: a tqdm bar on a terminal, periodic log lines elsewhere, nothing when disabled."""

import io
import logging

from eesd.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="eesd.progress")
    with Progress(4, "build: training", unit="step", stream=io.StringIO(), interval_s=3600) as progress:
        for step in range(4):
            progress.update(loss=f"{5 - step:.1f}")
    lines = [r.getMessage() for r in caplog.records]
    # The first update and the last one; the interval keeps the ones between quiet.
    assert len(lines) == 2
    assert lines[0].startswith("build: training 1/4 step (25%)") and "ETA " in lines[0] and "loss=5.0" in lines[0]
    assert lines[1].startswith("build: training 4/4 step (100%)") and "ETA" not in lines[1] and "loss=2.0" in lines[1]


def test_a_short_run_logs_its_final_count(caplog):
    caplog.set_level(logging.INFO, logger="eesd.progress")
    with Progress(10, "distill", unit="step", stream=io.StringIO(), interval_s=3600, initial=5) as progress:
        progress.update()
        progress.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "distill 6/10 step (60%)",
        "distill 7/10 step (70%)",
    ]


def test_bar_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="eesd.progress")
    terminal = Terminal()
    with Progress(3, "bench", unit="prompt", stream=terminal) as progress:
        for _ in range(3):
            progress.update(tau="2.10")
    shown = terminal.getvalue()
    assert "bench" in shown and "3/3" in shown and "tau=2.10" in shown
    assert not caplog.records  # the bar replaces the log lines


def test_disabled_and_track(caplog):
    caplog.set_level(logging.INFO, logger="eesd.progress")
    terminal = Terminal()
    with Progress(3, "quiet", stream=terminal, enabled=False) as progress:
        progress.update(3)
    assert terminal.getvalue() == "" and not caplog.records
    assert list(track(range(3), "items", enabled=False)) == [0, 1, 2]
