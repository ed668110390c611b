"""Writes the Helm chart's values.schema.json from the services' config dataclasses, then renders the plain
kubectl manifests in deploy/k8s/ from the chart, with the real Helm engine.

    python deploy/render.py           # rewrite values.schema.json and deploy/k8s/*.yaml (make manifests)
    python deploy/render.py --check   # exit 1 when a committed file differs from what it is generated from

The chart is the single source of truth for the manifests: deploy/k8s/<example>.yaml is the chart rendered with
deploy/helm/examples/<example>.yaml as release "eesd" in namespace "eesd". Each role's `config` values are the
service's config fields (serving.config.field: type, help, default, Rules); the rest of the schema is declared
below (`values_schema`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_type_hints

import helm_python
import yaml

from controller.config import ControllerConfig
from drafter_service.config import DrafterConfig
from verifier_service.config import VerifierConfig

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "eesd"
SCHEMA = CHART / "values.schema.json"
EXAMPLES = DEPLOY / "helm" / "examples"
K8S = DEPLOY / "k8s"
RELEASE = "eesd"
NAMESPACE = "eesd"
# The examples turned into kubectl manifests; the others are exercised by the tests only.
MANIFEST_EXAMPLES = ("cpu", "gpu")

# Helm's install order, so `kubectl apply -f` creates what a pod refers to before the pod.
KIND_ORDER = [
    "NetworkPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "Certificate",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Role",
    "RoleBinding",
    "Service",
    "StatefulSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "PrometheusRule",
]


# ---------------------------------------------------------------- values.schema.json

# The config dataclass behind each role's `config` values (exitLayer: DrafterConfig.exit_layer).
CONFIGS = {"controller": ControllerConfig, "drafter": DrafterConfig, "verifier": VerifierConfig}
# Set by the templates rather than by values: the Secrets' tokens and the pod's own name.
FROM_TEMPLATES = {
    "controller": {"auth_token", "internal_token"},
    "drafter": {"node_id", "internal_token"},
    "verifier": {"node_id", "internal_token"},
}
# Config values the chart fills in when left empty (eesd.config in templates/_helpers.tpl), and with what:
# empty passes there whatever the service requires.
CHART_FILLED = {
    "controller": {
        "redisUrl": "the release's Redis, or memory:// without one",
        "drafters": "the release's drafter Service",
        "verifiers": "the release's verifier Service",
        "namespace": "the release's namespace",
        "drafterSelector": "the release's drafters",
        "verifierSelector": "the release's verifiers",
        "modelDir": "model.dir",
    },
    "drafter": {"modelDir": "model.dir", "verifiers": "the release's verifier Service"},
    "verifier": {"modelDir": "model.dir"},
}
# What the chart asks of a config value beyond the service's own rules: the Services, NetworkPolicy and
# ServiceMonitor expose the metrics port, and drafters and verifiers load from the model volume at /models.
_IN_MODEL_VOLUME = {"pattern": "^(/models/.+)?$"}
CHART_RULES = {
    "controller": {"metricsPort": {"minimum": 1}},
    "drafter": {"metricsPort": {"minimum": 1}, "modelDir": _IN_MODEL_VOLUME},
    "verifier": {"metricsPort": {"minimum": 1}, "modelDir": _IN_MODEL_VOLUME},
}
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}

STRING = {"type": "string"}
NON_EMPTY = {"type": "string", "minLength": 1}
BOOLEAN = {"type": "boolean"}
OBJECT = {"type": "object"}  # a Kubernetes structure, passed on as it is
ARRAY = {"type": "array"}
OBJECTS = {"type": "array", "items": OBJECT}
STRING_MAP = {"type": "object", "additionalProperties": STRING}  # labels, annotations, a node selector
INT_OR_STRING = {"type": ["string", "integer"]}  # 1 or 25%, 8Gi
PROMETHEUS_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
GO_DURATION = {"type": "string", "pattern": "^[0-9]+(h|m|s)([0-9]+(m|s))?$"}  # cert-manager's


def integer(minimum: int, maximum: int | None = None) -> dict:
    return {"type": "integer", "minimum": minimum} | ({} if maximum is None else {"maximum": maximum})


def enum(*values: str) -> dict:
    return {"enum": list(values)}


def closed(properties: dict[str, dict], required: Sequence[str] | None = None) -> dict:
    """An object whose unknown keys are typos; all its keys required (values.yaml sets each) unless `required`."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(properties if required is None else required),
    }


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def config_schema(role: str) -> dict:
    """A role's `config`: each field of its service's config dataclass but those the templates set, typed by its
    hint, described by its help, constrained by its Rules and the chart's (CHART_RULES, CHART_FILLED)."""
    cls = CONFIGS[role]
    hints = get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        if f.name in FROM_TEMPLATES[role]:
            continue
        name, rules = camel(f.name), f.metadata["rules"]
        filled = CHART_FILLED[role].get(name)
        prop = {"type": JSON_TYPES[hints[f.name]], **rules.json_schema(empty_allowed=filled is not None)}
        prop |= CHART_RULES[role].get(name, {})
        if rules.violation(f.default) is None:  # a placeholder (exit_layer 0, model_dir "") is no default
            prop["default"] = f.default
        prop["description"] = f.metadata["help"] + (f" (empty in the chart: {filled})" if filled else "")
        properties[name] = prop
    return closed(properties)


def image(repository: dict) -> dict:
    return closed({"repository": repository, "tag": STRING, "pullPolicy": enum("Always", "IfNotPresent", "Never")})


def token_secret() -> dict:
    return closed({"enabled": BOOLEAN, "existingSecret": STRING, "secretKey": NON_EMPTY, "token": STRING})


def role_schema(role: str) -> dict:
    """The block every role has (controller, drafter, verifier): one shape, its own config."""
    probe = closed(
        {
            name: integer(1)
            for name in (
                "periodSeconds",
                "failureThreshold",
                "timeoutSeconds",
                "initialDelaySeconds",
                "successThreshold",
            )
        },
        required=("periodSeconds", "failureThreshold"),
    )
    return closed(
        {
            "enabled": BOOLEAN,
            "replicas": integer(0),
            "image": image(NON_EMPTY),
            "config": {"$ref": f"#/$defs/{role}Config"},
            "gpus": integer(0) | {"description": "GPUs in limits (gpuResourceName)"},
            "resources": closed({"requests": OBJECT, "limits": OBJECT}, required=()),
            "nodeSelector": STRING_MAP,
            "tolerations": ARRAY,
            "affinity": OBJECT,
            "topologySpreadConstraints": OBJECTS,
            "priorityClassName": STRING,
            "runtimeClassName": STRING,
            "podAnnotations": STRING_MAP,
            "podLabels": STRING_MAP,
            "env": ARRAY,
            "extraVolumes": OBJECTS,
            "extraVolumeMounts": OBJECTS,
            "shmSize": INT_OR_STRING,
            "probes": closed({"startup": probe, "readiness": probe, "liveness": probe}),
            "terminationGracePeriodSeconds": integer(0),
            "preStopSleepSeconds": integer(0),
            "rollingUpdate": closed({"maxSurge": INT_OR_STRING, "maxUnavailable": INT_OR_STRING}),
            "autoscaling": closed(
                {
                    "enabled": BOOLEAN,
                    "minReplicas": integer(1),
                    "maxReplicas": integer(1),
                    "targetCPUUtilizationPercentage": integer(1, 100),
                    "metrics": ARRAY,
                }
            ),
            "podDisruptionBudget": closed({"enabled": BOOLEAN, "maxUnavailable": INT_OR_STRING}),
            "service": closed(
                {"type": enum("ClusterIP", "NodePort", "LoadBalancer"), "headless": BOOLEAN, "annotations": OBJECT}
            ),
        }
    )


def values_schema() -> dict:
    """The chart's values.schema.json: the roles' config from the services, the rest declared here."""
    model = closed(
        {
            "dir": {
                "type": "string",
                "pattern": "^/models/.+",
                "description": "the checkpoint every role serves unless its config.modelDir says otherwise",
            },
            "source": {
                "type": "string",
                "pattern": r"^($|https?://|hf://|[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^\s]+)?$)",
                "description": "a Hugging Face id or an http(s) archive URL fetched into the model volume; empty: none",
            },
            "hfTokenSecret": STRING,
            "claimName": STRING,
            "volume": {
                "type": "object",
                "maxProperties": 1,
                "description": "one Kubernetes volume source; empty: the claimName PVC",
            },
        }
    )
    tls = closed(
        {
            "enabled": BOOLEAN,
            "secretName": STRING,
            "internalClientAuth": BOOLEAN,
            "clientAuth": BOOLEAN,
            "certManager": closed(
                {
                    "enabled": BOOLEAN,
                    "issuerRef": closed({"name": STRING, "kind": enum("Issuer", "ClusterIssuer"), "group": NON_EMPTY}),
                    "duration": GO_DURATION,
                    "renewBefore": GO_DURATION,
                    "dnsNames": {"type": "array", "items": NON_EMPTY},
                }
            ),
        }
    )
    redis = closed(
        {
            "enabled": BOOLEAN,
            "image": image(STRING),
            "port": integer(1, 65535),
            "appendfsync": enum("always", "everysec", "no"),
            "caSecret": STRING,
            "persistence": closed({"enabled": BOOLEAN, "size": INT_OR_STRING, "storageClassName": STRING}),
            "resources": OBJECT,
            "nodeSelector": OBJECT,
            "tolerations": ARRAY,
            "affinity": OBJECT,
        }
    )
    prometheus_rule = closed(
        {
            "enabled": BOOLEAN,
            "labels": STRING_MAP,
            "selector": STRING,
            "noVerifierReadyFor": PROMETHEUS_DURATION,
            "acceptanceRateBelow": {"type": "number", "minimum": 0, "maximum": 1},
            "acceptanceCollapseFor": PROMETHEUS_DURATION,
            "ttftSloSeconds": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+$"},
            "ttftObjective": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "queueWaitingAbove": {"type": "number", "minimum": 0},
            "queueGrowingFor": PROMETHEUS_DURATION,
            "redisErrorsFor": PROMETHEUS_DURATION,
        }
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eesd chart values",
        "$comment": "Generated by `python deploy/render.py` from the services' config dataclasses; do not edit. "
        "A config value's default is the service's own; values.yaml may set another.",
        "$defs": {f"{role}Config": config_schema(role) for role in CONFIGS},
        **closed(
            {
                "nameOverride": STRING,
                "fullnameOverride": STRING,
                "imagePullSecrets": ARRAY,
                "gpuResourceName": NON_EMPTY,
                "podSecurityContext": OBJECT,
                "securityContext": OBJECT,
                "model": model,
                "auth": token_secret(),
                "internalAuth": token_secret(),
                "tls": tls,
                "redis": redis,
                "serviceAccount": closed({"create": BOOLEAN, "name": STRING, "annotations": OBJECT}),
                "networkPolicy": closed({"enabled": BOOLEAN, "controllerFrom": ARRAY, "metricsFrom": ARRAY}),
                "serviceMonitor": closed({"enabled": BOOLEAN, "interval": STRING, "labels": OBJECT}),
                "grafanaDashboard": closed(
                    {"enabled": BOOLEAN, "labels": STRING_MAP, "annotations": STRING_MAP, "namespace": STRING}
                ),
                "prometheusRule": prometheus_rule,
                **{role: role_schema(role) for role in CONFIGS},
            }
        ),
    }


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


# ---------------------------------------------------------------- kubectl manifests


def example_values(name: str) -> dict:
    return helm_python.values_from_yaml((EXAMPLES / f"{name}.yaml").read_text())


def render(values: dict | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` produces it."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace)


def objects(rendered: dict[str, str]) -> list[dict]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents left out), in install order."""
    docs = [
        doc
        for path, text in rendered.items()
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    unknown = {d["kind"] for d in docs} - set(KIND_ORDER)
    if unknown:
        raise ValueError(f"add {sorted(unknown)} to KIND_ORDER")
    return sorted(docs, key=lambda d: (KIND_ORDER.index(d["kind"]), d["metadata"]["name"]))


def manifest(example: str) -> str:
    header = (
        f"# Generated by `make manifests` from deploy/helm/eesd with deploy/helm/examples/{example}.yaml\n"
        f"# (release {RELEASE!r}, namespace {NAMESPACE!r}). Do not edit: change the chart or the example.\n"
        f"#   kubectl create namespace {NAMESPACE}\n"
        f"#   kubectl -n {NAMESPACE} create secret generic eesd-auth --from-literal=token=<token>\n"
        f"#   kubectl -n {NAMESPACE} create secret generic eesd-internal --from-literal=token=<another token>\n"
        f"#   kubectl apply -f deploy/k8s/{example}.yaml\n"
    )
    docs = objects(render(example_values(example)))
    return header + "".join("---\n" + yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []

    def emit(path: Path, text: str) -> None:
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")

    emit(SCHEMA, schema_text())  # first: the manifests render against it
    for example in MANIFEST_EXAMPLES:
        emit(K8S / f"{example}.yaml", manifest(example))
    if stale:
        print(f"stale, run `make manifests`: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
