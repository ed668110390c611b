"""eesd.hardware: `--dtype auto` is bfloat16 only where the device computes it natively (a CPU with avx512_bf16
or amx_bf16, a CUDA device with bf16 arithmetic), float32 elsewhere; every build and result that uses it
records the choice, and the reference build's stamp carries it."""

import contextlib

import pytest
import torch

from eesd import hardware
from eesd.distill import DistillConfig
from eesd.errors import InvalidArgument
from eesd.presets import reference_distill_config
from eesd.reference_model import Recipe, bf16_autocast_for, build_stamp


def cpuinfo(flags: str, model: str = "Fake CPU 9000") -> str:
    """/proc/cpuinfo of a two-core machine: one block per processor, the first one read."""
    block = f"processor\t: {{n}}\nvendor_id\t: Fake\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\nbugs\t\t:\n"
    return block.format(n=0) + "\n" + block.format(n=1)


AVX2_ONLY = cpuinfo("avx avx2 fma")
AVX512_BF16 = cpuinfo("avx2 avx512f avx512_bf16 avx512_vnni")
AMX = cpuinfo("avx2 avx512f amx_tile amx_bf16 amx_int8")
AVX512_NO_BF16 = cpuinfo("avx2 avx512f avx512_vnni")


@pytest.fixture
def this_cpu(monkeypatch):
    """Makes the machine's /proc/cpuinfo the text a test gives (as if the test ran there)."""
    return lambda text: monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: text)


@pytest.mark.parametrize(
    ("text", "native"), [(AVX512_BF16, True), (AMX, True), (AVX2_ONLY, False), (AVX512_NO_BF16, False), ("", False)]
)
def test_a_cpu_computes_bf16_natively_only_with_avx512_bf16_or_amx_bf16(this_cpu, text, native):
    assert hardware.native_bf16("cpu", text) is native
    this_cpu(text)
    assert hardware.dtype_name("auto") == ("bfloat16" if native else "float32")
    assert hardware.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_explicit_dtypes_are_kept_and_unknown_ones_refused(this_cpu):
    this_cpu(AVX2_ONLY)
    assert [hardware.dtype_name(n) for n in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    assert hardware.resolve_dtype("bfloat16") == torch.bfloat16  # asked for: emulated or not
    with pytest.raises(InvalidArgument, match="dtype: unknown dtype 'fp8'"):
        hardware.dtype_name("fp8")
    with pytest.raises(InvalidArgument, match="device"):
        hardware.native_bf16("tpu")


@pytest.mark.parametrize(
    ("available", "bf16", "expected"), [(False, True, "float32"), (True, False, "float32"), (True, True, "bfloat16")]
)
def test_on_cuda_auto_follows_the_device_without_counting_emulation(monkeypatch, available, bf16, expected):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here to select
    monkeypatch.setattr(hardware, "_announce", lambda device: None)  # would name the (absent) GPU
    assert hardware.dtype_name("auto", "cuda:0") == expected
    assert asked == ([False] if available else [])


def test_the_record_names_the_cpu_its_flags_and_the_choice(this_cpu):
    record = hardware.cpu_record(AMX)
    assert record["cpu"] == "Fake CPU 9000" and record["cores_available"] >= 1
    assert record["cpu_flags"] == {
        f: f in ("avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8") for f in hardware.CPU_FLAGS
    }
    this_cpu(AVX2_ONLY)
    full = hardware.hardware_record()
    assert full["auto_dtype"] == "float32" and full["native_bf16"] is False and full["cpu_flags"]["avx2"] is True
    assert full["torch_threads"] == torch.get_num_threads() and "cuda_device" in full
    assert "float32 on cpu (Fake CPU 9000; CPU flags: avx2)" in hardware.describe_auto()
    this_cpu(AVX512_BF16)
    assert (
        "bfloat16 on cpu (Fake CPU 9000; CPU flags: avx2 avx512_bf16 avx512_vnni avx512f)" in hardware.describe_auto()
    )


def test_the_reference_build_trains_in_the_resolved_dtype_and_its_stamp_says_which(this_cpu):
    this_cpu(AVX2_ONLY)
    emulated = Recipe()
    this_cpu(AVX512_BF16)
    native = Recipe()
    assert (emulated.bf16_autocast, native.bf16_autocast) == (False, True)
    assert bf16_autocast_for("float32") is False and bf16_autocast_for("bfloat16") is True
    assert build_stamp(emulated, "corpus") != build_stamp(native, "corpus")
    assert build_stamp(native, "corpus") == build_stamp(Recipe(bf16_autocast=True), "corpus")  # deterministic per dtype


def test_distillation_resolves_auto_for_its_corpus_and_the_reference_head_trains_in_bf16_only_natively(this_cpu):
    this_cpu(AVX2_ONLY)
    assert DistillConfig("m", 1, "out").corpus_key()["dtype"] == "float32"
    assert reference_distill_config("m", "h", 2, "p.jsonl").train_bf16 is False
    this_cpu(AMX)
    assert DistillConfig("m", 1, "out").corpus_key()["dtype"] == "bfloat16"
    assert reference_distill_config("m", "h", 2, "p.jsonl").train_bf16 is True
