"""The environment is exactly requirements.lock, and the locks agree with each other and the projects.

`make setup` installs the lock and `make lock` writes it; these fail when the venv drifted from it (a
package added, removed or at another version), when the lock no longer covers what pyproject.toml asks
for, or when an image's lock under deploy/docker/lock/ disagrees with it. `make check-lock` runs this file.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
DOCKER_LOCKS = ROOT / "deploy" / "docker" / "lock"
ROLE_LOCKS = ("protos", "controller", "model")
# Installed editable from the checkout (`pip install --no-deps -e`), never from the lock.
PROJECTS = {"eesd-serve", "eesd-client"}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


def read_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """Normalised name -> (pinned version, hashes) of a pip-compile output."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    # One entry per requirement: its line and the continuation lines after it.
    for entry in re.split(r"\n(?=\S)", path.read_text()):
        match = _PIN.match(entry)
        if match:
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = (match.group(2), frozenset(_HASH.findall(entry)))
    return pins


def installed() -> dict[str, str]:
    """Normalised name -> version of every distribution this interpreter sees, the projects left out."""
    found: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        found.setdefault(name, set()).add(dist.version)
    several = {name: sorted(versions) for name, versions in found.items() if len(versions) > 1}
    assert not several, f"several versions installed at once: {several}"
    return {name: versions.pop() for name, versions in found.items() if name not in PROJECTS}


def lock_differences(lock: dict[str, tuple[str, frozenset[str]]], env: dict[str, str]) -> list[str]:
    """What `make setup` would have to change to make `env` the lock: empty when they match."""
    out = []
    for name in sorted(lock.keys() | env.keys()):
        locked = lock[name][0] if name in lock else None
        have = env.get(name)
        if locked is None:
            out.append(f"{name}=={have} is installed but not in the lock")
        elif have is None:
            out.append(f"{name}=={locked} is locked but not installed")
        elif Version(have) != Version(locked):
            out.append(f"{name}: {have} installed, {locked} locked")
    return out


def test_environment_is_exactly_the_lock():
    differences = lock_differences(read_lock(LOCK), installed())
    assert not differences, (
        "the environment is not requirements.lock (`rm .venv/.installed && make setup` reinstalls it):\n"
        + "\n".join(differences)
    )


def test_lock_differences_are_found():
    lock = {"a": ("1.0", frozenset()), "b": ("2.0+cpu", frozenset()), "c": ("3", frozenset())}
    assert lock_differences(lock, {"a": "1.0", "b": "2.0+cpu", "c": "3.0"}) == []
    assert lock_differences(lock, {"a": "1.1", "b": "2.0", "d": "4"}) == [
        "a: 1.1 installed, 1.0 locked",
        "b: 2.0 installed, 2.0+cpu locked",
        "c==3 is locked but not installed",
        "d==4 is installed but not in the lock",
    ]


def test_installed_requirements_are_consistent():
    # The projects' own ranges (and the client's) hold for the locked versions.
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return [Requirement(r) for r in requirements]


@pytest.mark.parametrize("pyproject", ["pyproject.toml", "client/pyproject.toml"])
def test_lock_covers_the_projects(pyproject):
    lock = read_lock(LOCK)
    for requirement in _requirements(ROOT / pyproject):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(lock[name][0], prereleases=True), (requirement, lock[name][0])


def test_lock_is_hashed_and_holds_the_cpu_torch():
    lock = read_lock(LOCK)
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    assert lock["torch"][0].endswith("+cpu")
    # The CUDA build's companions would mean PyPI's torch was resolved.
    assert not [name for name in lock if name.startswith("nvidia-") or name == "triton"]
    # The installers and the build backend come from the lock too.
    assert {"pip", "setuptools", "pip-tools"} <= lock.keys()


@pytest.mark.parametrize("role", ROLE_LOCKS)
def test_image_locks_agree_with_the_lock(role):
    lock = read_lock(LOCK)
    image = read_lock(DOCKER_LOCKS / f"{role}.txt")
    assert image
    for name, (version, hashes) in image.items():
        assert name in lock and lock[name][0] == version, (name, version)
        assert hashes and hashes <= lock[name][1], name
    # Everything the role lists is there.
    listed = [line.strip() for line in (DOCKER_LOCKS / f"{role}.in").read_text().splitlines()]
    names = {canonicalize_name(line) for line in listed if line and not line.startswith("#")}
    assert names - {"torch"} <= image.keys()
    # torch comes from torch.txt, per build: never through a role's hashed lock.
    assert "torch" not in image
    if role == "controller":
        assert not image.keys() & {"transformers", "safetensors", "sympy", "networkx"}


def test_image_torch_is_the_locked_version():
    pins = [line for line in (DOCKER_LOCKS / "torch.txt").read_text().splitlines() if not line.startswith("#")]
    locked = Version(read_lock(LOCK)["torch"][0])
    assert pins == [f"torch=={locked.public}"]
