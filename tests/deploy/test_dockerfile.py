"""deploy/docker/Dockerfile agrees with the chart: user, ports, entry modules, torch-free controller.

No Docker engine runs here, so these read the Dockerfile as text; what they check is what the chart
assumes about the images it runs.
"""

from __future__ import annotations

import fnmatch
import re

import pytest
from deploy_helpers import ROLES, ROOT, release_for

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"


def stages() -> dict[str, dict]:
    """Stage name -> {"base": FROM argument, "lines": instructions (continuations joined)}."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = out.setdefault(match.group(2), {"base": match.group(1), "lines": []})
        elif current is not None:
            current["lines"].append(line)
    return out


def ancestry(name: str, all_stages: dict[str, dict]) -> list[str]:
    chain = [name]
    base = all_stages[name]["base"]
    while True:
        if base == "torch-${BASE}":  # BASE=cpu|cuda: both bases are ancestors
            return chain + ["torch-cpu", "torch-cuda", *ancestry("torch-cpu", all_stages)[1:]]
        if base not in all_stages:
            return chain
        chain.append(base)
        base = all_stages[base]["base"]


def instruction(stage: dict, keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage["lines"] if line.split(None, 1)[0].upper() == keyword]


def test_base_is_selected_by_build_argument():
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert re.search(r"^ARG BASE=cpu$", header, re.MULTILINE)
    all_stages = stages()
    assert {"torch-cpu", "torch-cuda"} <= set(all_stages)
    assert all_stages["model-runtime"]["base"] == "torch-${BASE}"
    assert any("/whl/cpu" in run for run in instruction(all_stages["torch-cpu"], "RUN"))


@pytest.mark.parametrize("role", ROLES)
def test_role_image_matches_the_chart(role):
    all_stages = stages()
    stage = all_stages[role]
    chart = release_for("gpu")
    pod = chart.pod_spec(role)
    (container,) = pod["containers"]
    assert instruction(stage, "USER") == [
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    ]
    exposed = {int(p) for p in instruction(stage, "EXPOSE")[0].split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    cmd = instruction(stage, "CMD")[0]
    assert cmd == '["' + '", "'.join(container["command"]) + '"]'
    # Protos generated in the build, copied into every role.
    copies = [c for s in ancestry(role, all_stages) for c in instruction(all_stages[s], "COPY")]
    assert any(c.startswith("--from=protos ") for c in copies)


def test_controller_image_has_no_torch_and_model_images_no_redis():
    all_stages = stages()
    controller_runs = " ".join(r for s in ancestry("controller", all_stages) for r in instruction(all_stages[s], "RUN"))
    assert "torch" not in controller_runs
    assert "kubernetes" in controller_runs and "redis" in controller_runs
    for role in ("drafter", "verifier"):
        runs = " ".join(r for s in ancestry(role, all_stages) for r in instruction(all_stages[s], "RUN"))
        assert "torch==" in runs and "transformers" in runs
        assert "redis" not in runs and "kubernetes" not in runs


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        glob = pattern.replace("**/", "*/")
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_admits_exactly_what_the_images_copy():
    lines = DOCKERIGNORE.read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = []
    for stage in stages().values():
        for copy in instruction(stage, "COPY"):
            if not copy.startswith("--from"):
                sources += copy.split()[:-1]
    assert sources
    for source in sources:
        assert not _ignored(source.rstrip("/"), patterns), source
        # The service packages are written alongside; everything else must already be there.
        assert (ROOT / source).exists() or source.endswith("_service/"), source
    for private in (
        "tests/unit/test_discovery.py",
        ".venv/bin/python",
        "deploy/k8s/gpu.yaml",
        "eesd/__pycache__/x.pyc",
    ):
        assert _ignored(private, patterns), private
