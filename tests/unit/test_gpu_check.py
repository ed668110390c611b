"""tests/gpu_check.sh runs the engine tests on a GPU image that holds PyTorch and transformers but none of the
serving stack, so the code those tests load from this repository must import nothing else."""

import ast
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
GPU_TESTS = ("tests.unit.test_greedy_equality", "tests.unit.test_batched_engine", "tests.unit.test_engine_sampling")
NEEDS = ("torch", "transformers", "scipy", "pytest", "pytest-timeout")  # what the script's header promises


def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The distributions `names` install, their own requirements included (extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_the_gpu_check_needs_only_torch_transformers_scipy_and_pytest():
    loaded = subprocess.run(
        [sys.executable, "-c", f"import json, sys, tests.conftest, {', '.join(GPU_TESTS)}; "
         "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    files = [Path(f) for f in json.loads(loaded.stdout.splitlines()[-1]) if f]
    ours = [f for f in files if f.is_relative_to(ROOT) and f.relative_to(ROOT).parts[0] in ("eesd", "tests")]
    assert any(f.name == "engine.py" for f in ours)
    imported = set()
    for path in ours:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"eesd", "tests"}
    distributions, allowed = metadata.packages_distributions(), requirement_closure(NEEDS)
    sources = {module: {canonicalize_name(d) for d in distributions.get(module, [module])} for module in third_party}
    outside = {module: dists for module, dists in sources.items() if not dists & allowed}
    assert not outside, f"tests/gpu_check.sh would need {outside}"
