"""Renders of the Helm chart with the real Helm engine (helm-python-sdk), shared by the deploy tests.

A plain module rather than conftest.py: test directories here have no __init__.py, and a second
conftest imported by name elsewhere would shadow it."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("cpu", "gpu", "external-redis", "ha-redis", "autoscaling", "pod-fields", "model-fetch", "tls")
ROLES = ("controller", "drafter", "verifier")


def _load_render_module():
    spec = importlib.util.spec_from_file_location("eesd_deploy_render", ROOT / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render_module()


class Release:
    """One rendered release: its objects and lookups by kind/name/component."""

    def __init__(self, values: dict) -> None:
        self.values = values
        self.files = render.render(values)
        self.objects = render.objects(self.files)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
        return matches[0]

    def component(self, kind: str, component: str) -> dict:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert len(matches) == 1, f"{kind} of {component}: {len(matches)} found"
        return matches[0]

    def config(self, role: str) -> dict[str, str]:
        return self.component("ConfigMap", role)["data"]

    def pod_spec(self, role: str) -> dict:
        return self.component("Deployment", role)["spec"]["template"]["spec"]

    def pod(self, role: str) -> dict:
        """A pod of a role as the NetworkPolicy checks see it: namespace and labels."""
        workload = self.component("StatefulSet" if role == "redis" else "Deployment", role)
        return {
            "namespace": workload["metadata"]["namespace"],
            "labels": workload["spec"]["template"]["metadata"]["labels"],
        }

    def workloads(self) -> list[dict]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")


_cache: dict[str, Release] = {}


def release_for(example: str | None) -> Release:
    """`None` renders the chart's defaults; otherwise deploy/helm/examples/<example>.yaml."""
    key = example or "default"
    if key not in _cache:
        _cache[key] = Release(render.example_values(example) if example else {})
    return _cache[key]


# The services' config fields: the contract between the chart's `<role>.config` and the services.
CONFIGS, FROM_TEMPLATES = render.CONFIGS, render.FROM_TEMPLATES
SERVICE_FIELDS = {
    role: {f.name for f in dataclasses.fields(cls)} - FROM_TEMPLATES[role] for role, cls in CONFIGS.items()
}
