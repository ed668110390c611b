"""deploy/k8s/ holds the chart rendered for kubectl users; it must match what the chart renders now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_helpers import ROOT, render


@pytest.mark.parametrize("example", render.MANIFEST_EXAMPLES)
def test_committed_manifest_is_the_current_chart_render(example):
    committed = (ROOT / "deploy" / "k8s" / f"{example}.yaml").read_text()
    assert committed == render.manifest(example), "deploy/k8s is stale: run `make manifests` and commit"


@pytest.mark.parametrize("example", render.MANIFEST_EXAMPLES)
def test_manifest_is_namespaced_and_applies_dependencies_first(example):
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / f"{example}.yaml").read_text()) if d]
    assert docs and all(d["metadata"]["namespace"] == render.NAMESPACE for d in docs)
    kinds = [d["kind"] for d in docs]
    assert kinds.index("ConfigMap") < kinds.index("Deployment")
    assert kinds.index("Service") < kinds.index("Deployment")


def test_check_mode_detects_a_stale_manifest(tmp_path, monkeypatch):
    """`render.py --check` (the same comparison, as a command) fails on a drifted file."""
    ok = subprocess.run([sys.executable, str(ROOT / "deploy" / "render.py"), "--check"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    for example in render.MANIFEST_EXAMPLES:
        (tmp_path / f"{example}.yaml").write_text(render.manifest(example))
    (tmp_path / "gpu.yaml").write_text(render.manifest("gpu").replace("replicas: 2", "replicas: 3", 1))
    monkeypatch.setattr(render, "K8S", tmp_path)
    monkeypatch.setattr(sys, "argv", ["render.py", "--check"])
    assert render.main() == 1


def test_kubectl_manifests_pass_the_kubernetes_validate_cli_strict():
    """What a kubectl user applies, checked by the `kubernetes-validate --strict` command itself."""
    cli = Path(sys.executable).parent / "kubernetes-validate"
    files = [str(ROOT / "deploy" / "k8s" / f"{example}.yaml") for example in render.MANIFEST_EXAMPLES]
    result = subprocess.run([str(cli), "--strict", "--quiet", "-k", "1.30.0", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
