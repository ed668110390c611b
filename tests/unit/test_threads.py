"""Training entry points make torch's OpenMP threads wait passively (eesd/threads.py): the policy reaches the
runtime only when set before torch loads it, which these checks read back from libgomp itself."""

import os
import subprocess
import sys

import pytest


def spin_count(args: list[str], **env: str) -> str:
    """GOMP_SPINCOUNT as libgomp reports it (OMP_DISPLAY_ENV) the last time the command loaded torch."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, *args], env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env}, capture_output=True, text=True
    )
    lines = [line for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not lines:
        pytest.skip(f"torch's OpenMP runtime is not GNU libgomp: {done.stderr[-500:]}")
    return lines[-1].split("=")[1].strip().strip("'")


@pytest.mark.slow  # ~30 s: four Python processes, each loading torch
def test_training_entry_points_wait_passively(tmp_path):
    assert spin_count(["-c", "import eesd.cli, torch"]) != "0"  # libgomp's default (spin, then sleep) for inference
    assert spin_count(["-c", "from eesd.threads import for_training; for_training(); import torch"]) == "0"
    # eesd model / distill set it before torch loads; this one fails (nothing built) after loading torch.
    assert spin_count(["-m", "eesd.cli", "model", "--skip-build", "--out", str(tmp_path / "none")]) == "0"
    # python -m eesd.reference_model has loaded torch by the time main() runs: it restarts itself.
    assert spin_count(["-m", "eesd.reference_model", "--help"]) == "0"


def test_a_policy_the_user_chose_is_kept():
    code = "from eesd.threads import for_training; for_training(); import torch"
    assert spin_count(["-c", code], OMP_WAIT_POLICY="ACTIVE") not in ("0", "300000")
