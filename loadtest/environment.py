"""What a measurement ran on, recorded in every report under loadtest/ (load test, hostile input, fault trials):
the commit and whether the working tree differed from it, the machine (CPU model and the flags that decide
bf16/AMX speed, cores, memory), the load average, and the served model as its files describe it."""

import json
import os
import platform
import subprocess
from pathlib import Path

import grpc

from eesd import hardware


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine() -> dict:
    """eesd.hardware's CPU record (model, CPU flags, cores) and the rest of the machine."""
    return {
        **hardware.cpu_record(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": load_average(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.rstrip()
    except OSError:
        return ""


def modified_paths() -> list[str]:
    """Tracked files whose working-tree content differs from HEAD (untracked files are not counted)."""
    lines = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    return sorted(line[3:].split(" -> ")[-1] for line in lines if len(line) > 3)


def commit() -> str:
    """The short commit, with "-dirty" when tracked files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    return f"{head}-dirty" if head and modified_paths() else head


def source_tree(results_dir: str | Path | None = None) -> dict:
    """The commit and which tracked files differed from it (another engineer's edit in a shared tree shows).
    Files under `results_dir` are not counted: the run itself rewrites them (`make bench | tee` truncates the
    report before the run starts), which says nothing of the code measured."""
    short, modified = _git("rev-parse", "--short", "HEAD"), modified_paths()
    if results_dir is not None:
        top, results = Path(_git("rev-parse", "--show-toplevel") or "."), Path(results_dir).resolve()
        modified = [path for path in modified if not (top / path).resolve().is_relative_to(results)]
    return {
        "commit": f"{short}-dirty" if short and modified else short,
        "head": _git("rev-parse", "HEAD"),
        "dirty": bool(modified),
        "modified": modified,
    }


def model_description(model_dir: str | Path | None, exit_layer: int | None, exit_head: str | None, dtype: str | None):
    """The served model as its files say: name, architecture and size, exit layer N, exit head, dtype."""
    if model_dir is None:
        return None
    path = Path(model_dir)
    out: dict = {"name": path.name, "model_dir": str(model_dir), "exit_layer": exit_layer}
    out["exit_head"] = str(exit_head) if exit_head else None  # None: an untrained exit layer
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key, name in (("model_type", "architecture"), ("num_hidden_layers", "layers"), ("hidden_size", "hidden")):
        out[name] = config.get(key)
    out["vocab_size"] = config.get("vocab_size")
    try:
        out["parameters"] = json.loads((path / "build_report.json").read_text()).get("parameters")
    except (OSError, ValueError):
        out["parameters"] = None
    stored = config.get("dtype") or config.get("torch_dtype")
    # auto as eesd.hardware resolves it on this machine (a local stack's); unknown (None): what the files store
    out["dtype"] = stored if dtype is None else hardware.dtype_name(dtype)
    out["dtype_stored"] = stored
    return out
