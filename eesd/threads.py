"""How a training process's torch threads wait for each other: passively, so that the model build and the
distillation degrade gracefully when other processes share the cores instead of collapsing.

torch's CPU kernels run on OpenMP (this wheel: GNU libgomp). A thread that reaches the end of a parallel
region first spins (GOMP_SPINCOUNT, 300000 pause loops by default) before it sleeps. When the cores are
shared, the thread it waits for is often descheduled and the spinning takes the core that thread needs.
Measured on 2 cores (docs/architecture.md §9.2), a reference-model training step with 2 threads:

- idle: 0.77 s spinning, 0.94-1.07 s passive, 1.37 s with 1 thread;
- one other CPU-bound process: 2.8-3.0 s spinning (3 to 67 s when other work came and went), 1.4-1.5 s
  passive (up to 3.4 s), 1.4 s with 1 thread (up to 6.3 s).

Inference is the other way round: a decode step is hundreds of tiny parallel regions, and waking a sleeping
thread for each costs more than they save (idle, 2 threads: 220 tokens/s spinning, 100 passive, 170 with 1
thread), so this is for training processes only; the local stack serves with 1 thread per process, which
never waits. The thread count stays fixed (Recipe.threads, part of the build stamp): nothing load-dependent
enters a build, and the wait policy changes when threads wait, never what they compute.

libgomp reads its settings once, when torch loads it, so the variable must be set before the process's first
`import torch`: the training entry points (`eesd model`, `eesd distill`, `python -m eesd.reference_model`,
the demo's first-run build) call `for_training` first. A policy the user set is kept.
"""

import logging
import os
import sys

log = logging.getLogger(__name__)
WAIT_POLICY = "PASSIVE"


def for_training(restart: bool = False) -> None:
    """OMP_WAIT_POLICY=PASSIVE for the OpenMP runtime torch loads, unless the user chose a policy. If torch is
    loaded already, only `restart` (for a program's own main) can apply it: the process re-executes itself
    with the variable set."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    elif restart:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "OMP_WAIT_POLICY": WAIT_POLICY})
    else:
        log.debug("torch is loaded already: its OpenMP threads keep spinning at barriers")
