"""The Helm chart, rendered by the real Helm engine (helm-python-sdk bundles Helm v4) on its defaults and on
each example values file: lint, strict Kubernetes schema validation, and what a deployment relies on."""

from __future__ import annotations

import json

import helm_python
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import EXAMPLES, ROLES, ROOT, SERVICE_FIELDS, Release, release_for, render

from controller.discovery import GRPC_PORT_NAME

CHART = ROOT / "deploy" / "helm" / "eesd"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas here.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def _error_messages(report: dict) -> list[str]:
    return report["errors"] + [m["error"] for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("example", (None, *EXAMPLES))
def test_helm_lint_strict(example):
    values = render.example_values(example) if example else None
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace="eesd")
    assert report["total_charts_linted"] == 1
    assert _error_messages(report) == []


def test_lint_reports_a_broken_template(tmp_path):
    """The lint check above can fail: the same call flags a template error."""
    import shutil

    broken = tmp_path / "eesd"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: {{ .Values.nope.deeper }}\n")
    assert _error_messages(helm_python.lint(broken, strict=True, kube_version="v1.30.0"))


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_valid_against_kubernetes_schemas_strict(release, kube_version):
    kinds = set()
    for obj in release.objects:
        if obj["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/")):
            continue  # CRDs: no upstream schema; checked in test_service_monitor_scrapes_all_roles, test_tls_*
        kubernetes_validate.validate(obj, kube_version, strict=True)
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_strict_validation_rejects_unknown_fields():
    """Strict mode is on: a misspelt field in a rendered object fails."""
    deployment = json.loads(json.dumps(release_for(None).component("Deployment", "drafter")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_values_schema_rejects_typos_and_bad_enums():
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        for bad in (
            {"drafter": {"config": {"dtype": "fp8"}}},
            {"verifier": {"gpu": 1}},
            {"controller": {"config": {"defaultPolicy": "greedy"}}},
            {"drafter": {"config": {"modelDir": "/data/model"}}},
        ):
            with pytest.raises(helm_python.HelmValuesError):
                chart.render(bad, name="eesd", namespace="eesd")


def test_role_blocks_have_one_shape():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    shapes = {role: sorted(values[role]) for role in ROLES}
    assert shapes["controller"] == shapes["drafter"] == shapes["verifier"]
    for key in ("image", "probes", "autoscaling", "podDisruptionBudget", "service", "rollingUpdate"):
        assert sorted(values["controller"][key]) == sorted(values["drafter"][key]) == sorted(values["verifier"][key])


def test_configmaps_carry_exactly_the_service_fields(release):
    for role in ROLES:
        data = release.config(role)
        assert all(key.startswith("EESD_") for key in data)
        fields = {key.removeprefix("EESD_").lower() for key in data}
        # Optional fields left empty are not rendered: the service default applies.
        assert fields <= SERVICE_FIELDS[role]
        optional = {"exit_head", "redis_ca_file", "internal_token_file", "auth_token_file", "tls_client_names"}
        optional |= {"tls_cert_file", "tls_key_file", "tls_ca_file", "internal_server_name"}  # set with tls.enabled
        optional |= {"served_model_name", "otlp_endpoint"}  # empty: the model directory's name; no tracing
        assert fields >= SERVICE_FIELDS[role] - optional, role
        assert "EESD_AUTH_TOKEN" not in data  # from the Secret, never a ConfigMap
        env_from = release.pod_spec(role)["containers"][0]["envFrom"]
        assert env_from == [{"configMapRef": {"name": release.component("ConfigMap", role)["metadata"]["name"]}}]


def test_gpu_limits_on_drafter_and_verifier_only():
    gpu = release_for("gpu")
    for role, expected in (("controller", None), ("drafter", 1), ("verifier", 1)):
        limits = gpu.pod_spec(role)["containers"][0]["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu") == expected, role
        cfg = gpu.config(role)
        if role != "controller":
            assert cfg["EESD_DEVICE"] == "cuda"
            assert gpu.pod_spec(role)["containers"][0]["image"].endswith("-cuda")
    # Separate GPU classes, each tolerating the GPU taint.
    assert gpu.pod_spec("drafter")["nodeSelector"] != gpu.pod_spec("verifier")["nodeSelector"]
    assert all(gpu.pod_spec(r)["tolerations"] for r in ("drafter", "verifier"))
    assert "nodeSelector" not in gpu.pod_spec("controller")
    for other in ("cpu", "external-redis", "autoscaling", None):
        for workload in release_for(other).workloads():
            for container in workload["spec"]["template"]["spec"]["containers"]:
                assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_device_and_gpus_must_agree():
    with pytest.raises(helm_python.HelmError, match="gpus > 0 needs config.device cuda"):
        render.render({"verifier": {"gpus": 1}})
    with pytest.raises(helm_python.HelmError, match="needs gpus > 0"):
        render.render({"drafter": {"config": {"device": "cuda"}}})


def test_probes_drain_and_shm_on_every_container(release):
    for workload in release.workloads():
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, (workload["metadata"]["name"], probe)
    for role in ROLES:
        spec = release.pod_spec(role)
        (container,) = spec["containers"]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == GRPC_PORT_NAME)
        assert int(release.config(role)["EESD_PORT"]) == grpc_port
        # With TLS the kubelet (plain text only) probes the health port instead.
        probed = int(release.config(role).get("EESD_HEALTH_PORT", "0")) or grpc_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": probed}  # native gRPC health checking
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        # Model loading: drafters and verifiers get minutes before the kubelet gives up.
        assert budget >= (600 if role != "controller" else 30)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 0 < pre_stop < spec["terminationGracePeriodSeconds"]
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_model_volume_read_only_for_every_role(release):
    """Drafter and verifier load weights; the controller reads the tokenizer and EOS ids."""
    for role in ROLES:
        spec = release.pod_spec(role)
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
        assert release.config(role)["EESD_MODEL_DIR"].startswith("/models/")
        assert any(v["name"] == "model" for v in spec["volumes"])


def test_pods_run_non_root_read_only(release):
    for workload in release.workloads():
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _selector_matches(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _parse_selector(text: str) -> dict:
    return {"matchLabels": dict(term.split("=", 1) for term in text.split(","))}


def test_discovery_selectors_match_exactly_the_role_services(release):
    cfg = release.config("controller")
    assert cfg["EESD_DISCOVERY"] == "kubernetes"
    assert cfg["EESD_NAMESPACE"] == render.NAMESPACE
    for role in ("drafter", "verifier"):
        selector = _parse_selector(cfg[f"EESD_{role.upper()}_SELECTOR"])
        # EndpointSlices carry their Service's labels: the selector must pick this role's Service only.
        services = [s for s in release.of_kind("Service") if _selector_matches(selector, s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in services] == [f"{render.RELEASE}-{role}"]
        (service,) = services
        assert service["spec"]["clusterIP"] == "None"  # headless: pods, not a virtual IP
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == GRPC_PORT_NAME)
        assert grpc["port"] == int(release.config(role)["EESD_PORT"])
        pod_labels = release.component("Deployment", role)["spec"]["template"]["metadata"]["labels"]
        assert _selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
        # The DNS fallback names the same Service.
        assert cfg[f"EESD_{role.upper()}S"] == f"{service['metadata']['name']}:{grpc['port']}"


def test_controller_may_watch_endpointslices_and_nothing_else(release):
    role = release.get("Role", f"{render.RELEASE}-discovery")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = release.get("RoleBinding", f"{render.RELEASE}-discovery")
    controller = release.pod_spec("controller")
    assert binding["subjects"][0]["name"] == controller["serviceAccountName"]
    assert controller["automountServiceAccountToken"] is True
    for role_name in ("drafter", "verifier"):
        assert release.pod_spec(role_name)["automountServiceAccountToken"] is False


def _allowed(policies: list[dict], target: dict, source: dict, port: int) -> bool:
    """NetworkPolicy ingress semantics for pods given as {"namespace", "labels"}."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target["namespace"]
        and _selector_matches(p["spec"]["podSelector"], target["labels"])
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_labels = {"kubernetes.io/metadata.name": source["namespace"]}
                if "namespaceSelector" in peer:
                    ns_ok = _selector_matches(peer["namespaceSelector"], ns_labels)
                else:
                    ns_ok = source["namespace"] == policy["metadata"]["namespace"]
                pod_ok = _selector_matches(peer.get("podSelector", {}), source["labels"])
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("example", (None, "gpu", "autoscaling"))
def test_network_policy_isolates_drafter_verifier_and_redis(example):
    rel = release_for(example)
    policies = rel.of_kind("NetworkPolicy")
    pods = {role: rel.pod(role) for role in (*ROLES, "redis")}
    ports = {role: int(rel.config(role)["EESD_PORT"]) for role in ROLES}
    ports["redis"] = 6379
    outsiders = {
        "same-namespace pod": {"namespace": render.NAMESPACE, "labels": {"app": "other"}},
        "other namespace": {"namespace": "default", "labels": {"app": "client"}},
        "other release": {
            "namespace": render.NAMESPACE,
            "labels": {**pods["controller"]["labels"], "app.kubernetes.io/instance": "other"},
        },
    }
    for name, outsider in outsiders.items():
        assert _allowed(policies, pods["controller"], outsider, ports["controller"]), name
        for role in ("drafter", "verifier", "redis"):
            assert not _allowed(policies, pods[role], outsider, ports[role]), (name, role)
    allowed_pairs = {
        ("controller", "drafter"),
        ("controller", "verifier"),
        ("verifier", "drafter"),
        ("drafter", "verifier"),
        ("controller", "redis"),
    }
    for source in ("controller", "drafter", "verifier", "redis"):
        for target in ("drafter", "verifier", "redis"):
            if source != target:
                expected = (source, target) in allowed_pairs
                assert _allowed(policies, pods[target], pods[source], ports[target]) == expected, (
                    source,
                    target,
                )


def test_redis_built_in_with_pvc_or_external_url():
    default = release_for(None)
    (sts,) = default.of_kind("StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert default.config("controller")["EESD_REDIS_URL"] == f"redis://{sts['spec']['serviceName']}:6379/0"
    external = release_for("external-redis")
    assert external.of_kind("StatefulSet") == []
    assert not any(p["metadata"]["name"].endswith("-redis") for p in external.of_kind("NetworkPolicy"))
    assert external.config("controller")["EESD_REDIS_URL"] == "redis://redis-master.data.svc.cluster.local:6379/0"


def test_built_in_redis_keeps_an_aof_on_its_volume():
    for values, volume in (({}, "pvc"), ({"redis": {"persistence": {"enabled": False}}}, "emptyDir")):
        (sts,) = Release(values).of_kind("StatefulSet")
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[args.index("--appendonly") + 1] == "yes"
        assert args[args.index("--appendfsync") + 1] == "everysec"
        assert args[args.index("--dir") + 1] == "/data"
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
        if volume == "pvc":
            assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        else:
            assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    with pytest.raises(helm_python.HelmValuesError):
        render.render({"redis": {"appendfsync": "sometimes"}})


def test_sentinel_and_tls_redis_urls_and_a_ca_secret():
    ha = release_for("ha-redis")
    assert ha.of_kind("StatefulSet") == []
    config = ha.config("controller")
    assert config["EESD_REDIS_URL"].startswith("redis+sentinel://") and config["EESD_STORE_WAIT_S"] == "90"
    values = {
        "redis": {"enabled": False, "caSecret": "redis-ca"},
        "controller": {"config": {"redisUrl": "rediss://r:6380/0"}},
    }
    rel = Release(values)
    assert rel.config("controller")["EESD_REDIS_CA_FILE"] == "/etc/eesd/redis-ca/ca.crt"
    spec = rel.pod_spec("controller")
    assert {"name": "redis-ca", "mountPath": "/etc/eesd/redis-ca", "readOnly": True} in spec["containers"][0][
        "volumeMounts"
    ]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "redis-ca"]
    assert volume["secret"]["secretName"] == "redis-ca"
    assert not any(v["name"] == "redis-ca" for v in rel.pod_spec("drafter")["volumes"])
    assert "EESD_REDIS_CA_FILE" not in release_for(None).config("controller")
    with pytest.raises(helm_python.HelmValuesError):
        render.render({"controller": {"config": {"redisUrl": "redis-sentinel://h:26379/m"}}})


def test_memory_state_needs_a_single_controller():
    with pytest.raises(helm_python.HelmError, match="memory://"):
        render.render({"redis": {"enabled": False}})
    rel = render.objects(render.render({"redis": {"enabled": False}, "controller": {"replicas": 1}}))
    cm = next(o for o in rel if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-controller"))
    assert cm["data"]["EESD_REDIS_URL"] == "memory://"


def test_autoscaling_hpa_per_role_and_deployments_leave_replicas_to_it():
    rel = release_for("autoscaling")
    for role in ROLES:
        hpa = rel.component("HorizontalPodAutoscaler", role)
        deployment = rel.component("Deployment", role)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert "replicas" not in deployment["spec"]
    assert rel.component("HorizontalPodAutoscaler", "drafter")["spec"]["metrics"][0]["type"] == "Pods"
    assert release_for(None).of_kind("HorizontalPodAutoscaler") == []
    assert release_for(None).component("Deployment", "drafter")["spec"]["replicas"] == 1


def test_pdb_per_role(release):
    for role in ROLES:
        pdb = release.component("PodDisruptionBudget", role)
        labels = release.component("Deployment", role)["spec"]["template"]["metadata"]["labels"]
        assert _selector_matches(pdb["spec"]["selector"], labels)


def test_service_monitor_scrapes_all_roles():
    rel = release_for("autoscaling")
    (monitor,) = rel.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    scraped = [
        s for s in rel.of_kind("Service") if _selector_matches(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == list(ROLES)
    for service in scraped:
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert release_for(None).of_kind("ServiceMonitor") == []
    # Prometheus's namespace may reach the metrics ports, and only those.
    policies = rel.of_kind("NetworkPolicy")
    prometheus = {"namespace": "monitoring", "labels": {"app": "prometheus"}}
    for role in ROLES:
        assert _allowed(policies, rel.pod(role), prometheus, int(rel.config(role)["EESD_METRICS_PORT"]))
        grpc_open = _allowed(policies, rel.pod(role), prometheus, int(rel.config(role)["EESD_PORT"]))
        assert grpc_open == (role == "controller")


def test_auth_token_secret():
    default = release_for(None)
    secret = default.get("Secret", f"{render.RELEASE}-auth")
    assert len(secret["data"]["token"]) > 40  # generated, base64
    env = {e["name"]: e for e in default.pod_spec("controller")["containers"][0]["env"]}
    assert env["EESD_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{render.RELEASE}-auth",
        "key": "token",
    }
    for role in ("drafter", "verifier"):
        assert "EESD_AUTH_TOKEN" not in {e["name"] for e in default.pod_spec(role)["containers"][0]["env"]}
    gpu = release_for("gpu")
    assert gpu.of_kind("Secret") == []
    env = {e["name"]: e for e in gpu.pod_spec("controller")["containers"][0]["env"]}
    assert env["EESD_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "eesd-auth"
    fixed = render.objects(render.render({"auth": {"token": "s3cret"}}))
    (secret,) = [o for o in fixed if o["kind"] == "Secret" and o["metadata"]["name"] == f"{render.RELEASE}-auth"]
    assert secret["data"]["token"] == "czNjcmV0"


def test_notes_tell_how_to_reach_the_controller():
    notes = release_for(None).files["eesd/templates/NOTES.txt"]
    assert f"port-forward svc/{render.RELEASE}-controller 50051:50051" in notes
    assert f"get secret {render.RELEASE}-auth" in notes


def test_every_role_serves_model_dir_unless_it_says_otherwise():
    """One value names the checkpoint: the controller reads the tokenizer of the model the nodes serve (the
    GPU example once gave the controller another model than its nodes)."""
    for example, expected in ((None, "/models/reference"), ("gpu", "/models/llama-3.1-8b-instruct")):
        release = release_for(example)
        assert {role: release.config(role)["EESD_MODEL_DIR"] for role in ROLES} == dict.fromkeys(ROLES, expected)
    own = Release({"model": {"dir": "/models/a"}, "drafter": {"config": {"modelDir": "/models/b"}}})
    assert own.config("controller")["EESD_MODEL_DIR"] == own.config("verifier")["EESD_MODEL_DIR"] == "/models/a"
    assert own.config("drafter")["EESD_MODEL_DIR"] == "/models/b"


def test_standard_pod_fields_reach_every_role():
    release = release_for("pod-fields")
    for role in ROLES:
        spec = release.pod_spec(role)
        assert spec["priorityClassName"] == "inference-critical"
    assert release.pod_spec("verifier")["runtimeClassName"] == "nvidia"
    spread = release.pod_spec("controller")["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    drafter = release.pod_spec("drafter")
    assert {"name": "hf-cache", "emptyDir": {"sizeLimit": "10Gi"}} in drafter["volumes"]
    assert {"name": "hf-cache", "mountPath": "/cache/hf"} in drafter["containers"][0]["volumeMounts"]
    assert {"name": "HF_HOME", "value": "/cache/hf"} in drafter["containers"][0]["env"]
    controller = release.component("Deployment", "controller")["spec"]["template"]
    assert controller["metadata"]["annotations"]["example.com/team"] == "inference"


def test_a_model_source_is_fetched_by_the_verifier_and_awaited_by_the_others():
    release = release_for("model-fetch")
    for role in ROLES:
        spec = release.pod_spec(role)
        (init,) = spec["initContainers"]
        model_mount = next(m for m in init["volumeMounts"] if m["name"] == "model")
        claim = next(v for v in spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"]
        main_mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model")
        assert main_mount["readOnly"] is True
        if role == "verifier":
            assert init["command"][-4:] == [
                "--source",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--dest",
                "/models/llama-3.1-8b-instruct",
            ]
            assert model_mount["readOnly"] is False and claim["readOnly"] is False
            assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in init[
                "env"
            ]
        else:
            assert init["command"][-3:] == ["--wait", "--dest", "/models/llama-3.1-8b-instruct"]
            assert model_mount["readOnly"] is True and claim["readOnly"] is True
    assert all("initContainers" not in release_for(None).pod_spec(role) for role in ROLES)
    with pytest.raises(helm_python.HelmError):
        render.render({"model": {"source": "not a source"}})


def test_internal_token_secret_reaches_every_role():
    """Drafters and verifiers accept calls only with the internal token; the controller and drafters send it."""
    default = release_for(None)
    secret = default.get("Secret", f"{render.RELEASE}-internal")
    assert len(secret["data"]["token"]) > 40
    assert secret["data"]["token"] != default.get("Secret", f"{render.RELEASE}-auth")["data"]["token"]
    for role in ROLES:
        env = {e["name"]: e for e in default.pod_spec(role)["containers"][0]["env"]}
        assert env["EESD_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{render.RELEASE}-internal",
            "key": "token",
        }
        gpu = {e["name"]: e for e in release_for("gpu").pod_spec(role)["containers"][0]["env"]}
        assert gpu["EESD_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "eesd-internal"  # existingSecret
    off = render.objects(render.render({"internalAuth": {"enabled": False}}))
    assert [o for o in off if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-internal")] == []
    assert default.config("drafter").get("EESD_INTERNAL_TLS") == "false"


def test_tls_mounts_the_secret_and_probes_in_plain_text():
    rel = release_for("tls")
    (certificate,) = rel.of_kind("Certificate")
    fn = render.RELEASE
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == f"{fn}-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "eesd-ca", "kind": "Issuer", "group": "cert-manager.io"}
    names = certificate["spec"]["dnsNames"]
    assert f"{fn}-internal" in names and "eesd.example.com" in names
    for role in ROLES:
        assert f"{fn}-{role}.{render.NAMESPACE}.svc" in names
        config = rel.config(role)
        assert config["EESD_TLS_CERT_FILE"] == "/etc/eesd/tls/tls.crt"
        assert config["EESD_TLS_KEY_FILE"] == "/etc/eesd/tls/tls.key"
        assert config["EESD_TLS_CA_FILE"] == "/etc/eesd/tls/ca.crt"
        assert config["EESD_INTERNAL_TLS"] == "true"
        assert config["EESD_INTERNAL_SERVER_NAME"] == f"{fn}-internal"
        assert config["EESD_TLS_CLIENT_AUTH"] == "true"  # internal mutual TLS, and clientAuth at the controller
        # Nodes accept only the release's certificate; the controller any client certificate of the CA.
        assert config.get("EESD_TLS_CLIENT_NAMES") == (None if role == "controller" else f"{fn}-internal")
        health = int(config["EESD_HEALTH_PORT"])
        assert health == int(config["EESD_METRICS_PORT"]) + 100
        spec = rel.pod_spec(role)
        (container,) = spec["containers"]
        assert {"name": "health", "containerPort": health, "protocol": "TCP"} in container["ports"]
        assert container["readinessProbe"]["grpc"] == {"port": health}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": "/etc/eesd/tls", "readOnly": True}
        volume = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == f"{fn}-tls"
    # Without cert-manager, a Secret of your own; clientAuth off leaves the controller's clients without certificates.
    own = Release({"tls": {"enabled": True, "secretName": "my-tls"}})
    assert own.of_kind("Certificate") == []
    assert own.config("controller")["EESD_TLS_CLIENT_AUTH"] == "false"
    assert own.config("verifier")["EESD_TLS_CLIENT_AUTH"] == "true"
    assert next(v for v in own.pod_spec("drafter")["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "my-tls"
    # TLS off (the default): no mount, probes on the gRPC port.
    default = release_for(None)
    assert all("EESD_TLS_CERT_FILE" not in default.config(role) for role in ROLES)
    with pytest.raises(helm_python.HelmError, match="issuerRef.name"):
        render.render({"tls": {"enabled": True, "certManager": {"enabled": True}}})


def test_the_role_environment_reaches_the_model_fetch():
    """A hub mirror (HF_ENDPOINT in verifier.env) is where the init container fetches the model from too."""
    mirror = {"name": "HF_ENDPOINT", "value": "http://hf-mirror.internal"}
    spec = Release({"model": {"source": "org/name@v1"}, "verifier": {"env": [mirror]}}).pod_spec("verifier")
    (init,) = spec["initContainers"]
    assert mirror in init["env"] and mirror in spec["containers"][0]["env"]
