"""The chart's Grafana dashboard and PrometheusRule: they load, they are switched by their values, and every
metric their PromQL names is one the services export (the families of serving/metrics.py, as exposed)."""

import json
import re

import pytest
from deploy_helpers import ROOT, Release, release_for
from prometheus_client import CollectorRegistry

from serving.metrics import ControllerMetrics, RpcMetrics, _NodeFamilies

DASHBOARD = ROOT / "deploy" / "helm" / "eesd" / "dashboards" / "eesd.json"
METRIC = re.compile(r"\b(?:vllm|eesd):[A-Za-z0-9_:]+")
ALERTS = {
    "EesdNoVerifierReady",
    "EesdAcceptanceCollapse",
    "EesdTTFTSLOBurnFast",
    "EesdTTFTSLOBurnSlow",
    "EesdQueueGrowing",
    "EesdRedisErrors",
}


def exported() -> set[str]:
    """Every series name the services can expose: counters as <name>_total, histograms as _bucket, _sum and
    _count, gauges as they are."""
    registry = CollectorRegistry()
    ControllerMetrics(registry, model="m")
    _NodeFamilies(registry)
    RpcMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + s for family in registry.collect() for s in suffixes[family.type]}


def balanced(expr: str) -> bool:
    text, pairs, stack = re.sub(r'"[^"]*"', '""', expr), {")": "(", "]": "[", "}": "{"}, []
    for c in text:
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


@pytest.fixture(scope="module")
def monitored() -> Release:
    return release_for("autoscaling")  # the example with the ServiceMonitor, the dashboard and the rules


def test_dashboard_loads_and_is_shipped_for_the_grafana_sidecar(monitored):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and len(dashboard["panels"]) > 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (config_map,) = [c for c in monitored.of_kind("ConfigMap") if "eesd.json" in c["data"]]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["eesd.json"]) == dashboard
    assert not [c for c in release_for(None).of_kind("ConfigMap") if "eesd.json" in c["data"]]  # off by default


def test_rules_load_and_are_switched_by_their_value(monitored):
    (rule,) = monitored.of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prometheus"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["expr"] and balanced(r["expr"]), r["alert"]
        assert re.fullmatch(r"[0-9]+[smh]", r["for"]) and r["labels"]["severity"] in ("warning", "critical")
        assert "{{" not in r["expr"] and "$" not in r["expr"]  # every template value was filled in
    assert release_for(None).of_kind("PrometheusRule") == []


def test_every_metric_the_dashboard_and_rules_query_is_exported(monitored):
    names = exported()
    assert {"vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_waiting", "eesd:rounds_total"} <= names
    (rule,) = monitored.of_kind("PrometheusRule")
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    queries += [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    used = {name for query in queries for name in METRIC.findall(query)}
    assert len(used) > 20
    assert used - names == set()
    for query in queries:
        assert balanced(query), query


def test_the_ttft_bound_is_a_bucket_the_histogram_has():
    """The burn-rate rule reads the bucket le=<ttftSloSeconds>: it must be one of the histogram's bounds."""
    from serving.metrics import TTFT_BUCKETS

    release = Release({"prometheusRule": {"enabled": True, "ttftSloSeconds": "2.5", "ttftObjective": 0.995}})
    (rule,) = release.of_kind("PrometheusRule")
    fast = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "EesdTTFTSLOBurnFast")
    assert 'le="2.5"' in fast["expr"] and "> 0.072" in fast["expr"]  # 14.4 x (1 - 0.995)
    assert 2.5 in TTFT_BUCKETS and 1.0 in TTFT_BUCKETS


def test_the_autoscaling_example_scales_on_metrics_the_services_export():
    """An HPA names a metric as the Prometheus adapter exposes it (docs/deployment.md §6: `a:b` as `a_b`)."""
    series = {name.replace(":", "_"): name for name in exported()}
    release = release_for("autoscaling")
    named = [
        metric["pods"]["metric"]["name"]
        for hpa in release.of_kind("HorizontalPodAutoscaler")
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Pods"
    ]
    assert named and all(name in series for name in named), (named, sorted(series))
