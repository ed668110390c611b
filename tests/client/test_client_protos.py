"""The protocol itself: buf lint, generated stubs current and importable, the client package buildable."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from client_fakes import ROOT

from eesd_proto import generate
from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc, drafter_pb2, verifier_pb2

BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_buf_lint_passes() -> None:
    # Not skipped when buf is missing: `make test` installs it (make proto-tools).
    assert BUF.exists(), "buf is not installed: run `make proto-tools`"
    lint = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_generated_stubs_are_current() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate.run_protoc(Path(tmp))
        expected = generate.outputs(Path(tmp))
    stale = [str(path.relative_to(ROOT)) for path, text in expected.items() if path.read_text() != text]
    assert not stale, f"stale stubs, run `make proto`: {stale}"


def test_services_expose_the_protocol() -> None:
    methods = {
        service.name: [m.name for m in service.methods]
        for module in (controller_pb2, drafter_pb2, verifier_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert methods == {
        "ControllerService": ["Generate", "Cancel", "GetSession"],
        "DrafterService": ["GetModelIdentity", "OpenSession", "Prefill", "CloseSession", "Draft"],
        "VerifierService": [
            "GetModelIdentity",
            "OpenSession",
            "Prefill",
            "CloseSession",
            "VerifyStream",
            "Verify",
        ],
    }
    # Every round message carries the round's key.
    for message in (
        drafter_pb2.DraftRequest,
        drafter_pb2.DraftResponse,
        verifier_pb2.VerifyRequest,
        verifier_pb2.Verdict,
        verifier_pb2.RoundError,
        verifier_pb2.VerifierServicePrefillRequest,
    ):
        assert {"session_id", "round", "base_length"} <= set(message.DESCRIPTOR.fields_by_name), message
    assert controller_pb2_grpc.ControllerServiceStub is not None


def _minimum(requirements: list[str], name: str) -> tuple[int, ...]:
    spec = next(r for r in requirements if r.startswith(name))
    return tuple(int(p) for p in re.search(r">=([\d.]+)", spec).group(1).split("."))


def test_client_requirements_cover_the_generated_stubs() -> None:
    requirements = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    stubs = ROOT / "client" / "eesd_client" / "_proto" / "eesd" / "v1"
    runtime = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", (stubs / "controller_pb2.py").read_text())
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "controller_pb2_grpc.py").read_text())
    assert _minimum(requirements, "protobuf") >= tuple(int(g) for g in runtime.groups())
    assert _minimum(requirements, "grpcio") >= tuple(int(p) for p in grpc_version.group(1).split("."))


def test_client_wheel_holds_only_the_public_stubs(tmp_path: Path) -> None:
    # Build from a copy, so the test leaves no build/ or egg-info in the checkout.
    source = tmp_path / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("eesd_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "eesd_client/_proto/eesd/v1/controller_pb2_grpc.py" in names
    assert "eesd_client/_proto/eesd/v1/common_pb2.pyi" in names
    assert "eesd_client/py.typed" in names
    assert not any("drafter" in n or "verifier" in n for n in names)
