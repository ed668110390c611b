"""The hardware decides the dtype: the one rule behind `--dtype auto`, and the record of the machine that every
benchmark result and build report carries.

`auto` is bfloat16 only where the device computes it natively: a CUDA device with bf16 arithmetic
(torch.cuda.is_bf16_supported() without emulation), or a CPU whose flags include avx512_bf16 or amx_bf16;
float32 everywhere else. A CPU with AVX2 but neither flag only emulates bf16, slower than fp32: there a
training step of the reference recipe took 44 s under bf16 autocast against 2.9 s in fp32, and a 6-token
verify pass cost 1.7x a 1-token decode in bf16 against 1.02x in fp32.

torch is imported only where a torch answer is asked for: the load generator records the CPU without it.
"""

import functools
import logging
import os
import platform
from pathlib import Path

from eesd.errors import InvalidArgument

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "cpu or cuda (the current CUDA GPU; cuda:N for another)"
DTYPE_HELP = "auto (bfloat16 where the device computes it natively, else float32), float32, bfloat16 or float16"
# The CPU flags a result records: the vector units, and the two that make bf16 native.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so auto stays float32 on the CPU
        return ""


def _first_cpu(cpuinfo: str | None) -> dict[str, str]:
    """The `key: value` lines of the first processor's block (all cores of a machine report the same)."""
    block = (_proc_cpuinfo() if cpuinfo is None else cpuinfo).split("\n\n")[0]
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's flags as /proc/cpuinfo lists them (`cpuinfo`: that file's text, read when None)."""
    return frozenset(_first_cpu(cpuinfo).get("flags", "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    return _first_cpu(cpuinfo).get("model name") or platform.processor() or platform.machine()


def native_bf16(device: str = "cpu", cpuinfo: str | None = None) -> bool:
    """Whether `device` (cpu, cuda, cuda:N) computes bfloat16 natively."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return not cpu_flags(cpuinfo).isdisjoint(BF16_CPU_FLAGS)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    raise InvalidArgument("device", f"must be cpu or cuda, got {device!r}")


def check_device(device: str) -> None:
    """A --device the command can run on: cpu, or cuda / cuda:N with a GPU present."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument("device", f"must be cpu or cuda, got {device!r}")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument("device", "cuda requested but no GPU is available")


def dtype_name(name: str, device: str = "cpu") -> str:
    """The dtype `name` stands for on `device`: auto resolved by the rule above, the others as they are."""
    if name == "auto":
        _announce(device)
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in DTYPES:
        raise InvalidArgument("dtype", f"unknown dtype {name!r}; expected auto or one of {list(DTYPES)}")
    return name


def resolve_dtype(name: str, device: str = "cpu"):
    """`dtype_name` as a torch.dtype."""
    import torch

    return getattr(torch, dtype_name(name, device))


def describe_auto(device: str = "cpu") -> str:
    """What auto chooses on `device` and why, in one line (logged, and printed by the CLI)."""
    chosen = "bfloat16" if native_bf16(device) else "float32"
    if device.split(":")[0] == "cuda":
        import torch

        where = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "no CUDA device"
    else:
        flags = sorted(cpu_flags() & set(CPU_FLAGS))
        where = f"{cpu_model()}; CPU flags: {' '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}"
    why = "native bf16" if chosen == "bfloat16" else "no native bf16, which would be emulated, slower than float32"
    return f"dtype auto: {chosen} on {device} ({where}): {why}"


@functools.cache
def _announce(device: str) -> None:
    """Logs the choice once per process and device (a drafter and a verifier in one process resolve it twice)."""
    log.info("%s", describe_auto(device))


def cpu_record(cpuinfo: str | None = None) -> dict:
    """The CPU a result ran on: model, the CPU_FLAGS it has, the cores this process may use."""
    flags = cpu_flags(cpuinfo)
    return {
        "cpu": cpu_model(cpuinfo),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def hardware_record(device: str = "cpu") -> dict:
    """cpu_record, what auto chooses on `device`, and the torch that computes: its threads, the CPU kernels
    it dispatches to, the CUDA device."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        **cpu_record(),
        "device": device,
        "native_bf16": native_bf16(device),
        "auto_dtype": dtype_name("auto", device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
    }
