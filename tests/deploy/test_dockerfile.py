"""deploy/docker/Dockerfile agrees with the chart: user, ports, entry modules, torch-free controller,
and installs only from the locks under deploy/docker/lock/ (`make lock`).

No Docker engine runs here, so these read the Dockerfile as text; what they check is what the chart
assumes about the images it runs.
"""

from __future__ import annotations

import fnmatch
import re
import shlex

import pytest
from deploy_helpers import ROLES, ROOT, release_for

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
LOCKS = "deploy/docker/lock/"
# The one install by version only: torch's wheel differs by build (cpu, cu128, ...), see the Dockerfile.
TORCH_LOCK = LOCKS + "torch.txt"


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


def pip_installs(stage_names: list[str], all_stages: dict[str, dict]) -> list[tuple[list[str], list[str]]]:
    """(options, lock files in the repository) of every `pip install` in these stages."""
    out = []
    for name in stage_names:
        copied = {}  # path in the image -> path in the repository
        for copy in instruction(all_stages[name], "COPY"):
            if not copy.startswith("--from"):
                *sources, dest = copy.split()
                for source in sources:
                    copied[dest + source.rsplit("/", 1)[-1] if dest.endswith("/") else dest] = source
        for run in instruction(all_stages[name], "RUN"):
            words = shlex.split(run)
            if words[:2] != ["pip", "install"]:
                assert "pip install" not in run, run
                continue
            options, files, rest = [], [], words[2:]
            while rest:
                word = rest.pop(0)
                if word in ("-r", "--requirement"):
                    files.append(copied.get(rest.pop(0), "(not copied from the repository)"))
                elif word in ("--index-url", "--extra-index-url", "-i"):
                    options.append(f"{word} {rest.pop(0)}")
                else:
                    # A requirement named here rather than in a lock would be a name: every word is an option.
                    assert word.startswith("-"), f"{name}: pip install {word!r} names a package outside a lock"
                    options.append(word)
            out.append((options, files))
    return out


def locked_names(stage_names: list[str], all_stages: dict[str, dict]) -> set[str]:
    names = set()
    for _, files in pip_installs(stage_names, all_stages):
        for lock in files:
            for line in (ROOT / lock).read_text().splitlines():
                match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
                if match:
                    names.add(match.group(1).lower().replace("_", "-"))
    return names


def test_every_pip_install_takes_a_lock():
    all_stages = stages()
    installs = pip_installs(list(all_stages), all_stages)
    assert len(installs) >= 4
    for options, files in installs:
        assert files and all(f.startswith(LOCKS) and (ROOT / f).is_file() for f in files), files
        if files != [TORCH_LOCK]:
            # Exact versions and hashes, and nothing pip would resolve beyond them.
            assert "--require-hashes" in options and "--no-deps" in options, (options, files)
    # The torch install: the lock's version from the PyTorch index of the build.
    torch_installs = [options for options, files in installs if files == [TORCH_LOCK]]
    assert len(torch_installs) == 2
    assert all(any(o.startswith("--index-url https://download.pytorch.org/whl/") for o in t) for t in torch_installs)


def test_controller_image_has_no_torch_and_model_images_no_redis():
    all_stages = stages()
    controller = locked_names(ancestry("controller", all_stages), all_stages)
    assert "torch" not in controller and "transformers" not in controller
    assert {"kubernetes", "redis", "grpcio", "tokenizers"} <= controller
    for role in ("drafter", "verifier"):
        model = locked_names(ancestry(role, all_stages), all_stages)
        assert {"torch", "transformers", "safetensors", "grpcio"} <= model
        assert "redis" not in model and "kubernetes" not in model


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
        "deploy/docker/lock/model.in",
        "requirements.lock",
    ):
        assert _ignored(private, patterns), private
