"""values.schema.json is generated from the services' config dataclasses (deploy/render.py). The committed file
is the generated one, and every rule a config field declares (serving.config.Rules) is enforced twice: by the
service when it loads its config, and by Helm when it renders the chart, each naming the field."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import get_type_hints

import helm_python
import pytest
from deploy_helpers import CONFIGS, FROM_TEMPLATES, ROOT, render

from eesd.errors import InvalidArgument
from serving.config import Rules, flag_name, load_config

CHART = ROOT / "deploy" / "helm" / "eesd"
# Flags that make each service's config valid, so that the one bad value under test is what fails.
VALID_FLAGS = {
    "controller": ["--verifiers=verifier:50062"],
    "drafter": ["--model-dir=/models/m", "--exit-layer=2", "--verifiers=verifier:50062"],
    "verifier": ["--model-dir=/models/m"],
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def refused_by_helm(chart: helm_python.Chart, role: str, key: str, value: object) -> str:
    """Helm's message for `<role>.config.<key>: value`; fails the test when the chart renders."""
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart.render({role: {"config": {key: value}}}, name="eesd", namespace="eesd")
    return str(refused.value)


def test_committed_schema_is_the_generated_one():
    assert render.SCHEMA.read_text() == render.schema_text(), "stale: run `python deploy/render.py` and commit"


def test_check_mode_detects_a_stale_schema(tmp_path, monkeypatch, capsys):
    schema = render.values_schema()
    schema["$defs"]["drafterConfig"]["properties"]["port"]["minimum"] = 0  # a hand edit
    stale = tmp_path / "values.schema.json"
    stale.write_text(json.dumps(schema, indent=2) + "\n")
    monkeypatch.setattr(render, "SCHEMA", stale)
    monkeypatch.setattr(sys, "argv", ["render.py", "--check"])
    assert render.main() == 1
    assert str(stale) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("role", "key", "value", "why"),
    [
        ("drafter", "port", -1, "minimum"),
        ("verifier", "port", 70000, "maximum"),
        ("controller", "metricsPort", 0, "minimum"),  # the chart's rule: the service would take 0 (off)
        ("controller", "discovery", "consul", "must be one of"),
        ("drafter", "dtype", "fp8", "must be one of"),
        ("verifier", "logLevel", "LOUD", "must be one of"),
        ("controller", "nodeProbeS", 0, "exclusiveMinimum"),
        ("controller", "sessionTtlS", 1.5, "want integer"),
        ("controller", "loadAware", "yes", "want boolean"),
        ("controller", "otlpEndpoint", "otel:4317", "does not match pattern"),
        ("controller", "redisUrl", "postgres://db:5432", "does not match pattern"),
        ("drafter", "verifiers", "verifier", "does not match pattern"),
        ("drafter", "modelDir", "/data/model", "does not match pattern"),  # the chart's: inside the model volume
        ("controller", "host", "", "minLength"),
        ("drafter", "exitLayer", 0, "minimum"),
        ("verifier", "maxBatch", 0, "minimum"),
    ],
)
def test_helm_refuses_a_bad_config_value_naming_it(chart, role, key, value, why):
    message = refused_by_helm(chart, role, key, value)
    assert f"/{role}/config/{key}" in message and why in message, message


@pytest.mark.parametrize(
    ("role", "key", "value"),
    [
        ("drafter", "verifiers", "eesd-verifier:50062, [::1]:50062"),
        ("controller", "redisUrl", "redis+sentinel://sentinel-0:26379,sentinel-1:26379/mymaster/0"),
        ("controller", "redisUrl", "rediss://redis.example:6380/0"),
        ("controller", "otlpEndpoint", "https://otel-collector.monitoring:4317"),
        ("controller", "logLevel", "DEBUG"),
        ("verifier", "dtype", "bfloat16"),
    ],
)
def test_helm_and_the_service_take_a_good_value(chart, role, key, value):
    chart.render({role: {"config": {key: value}}}, name="eesd", namespace="eesd")
    name = next(f.name for f in dataclasses.fields(CONFIGS[role]) if render.camel(f.name) == key)
    load_config(CONFIGS[role], [*VALID_FLAGS[role], f"--{flag_name(name)}={value}"], env={})


def violations(rules: Rules, kind: type) -> Iterator[object]:
    """Values that break `rules`, one per rule."""
    if rules.choices:
        yield "no-such-choice"
    if rules.minimum is not None:
        yield kind(rules.minimum - 1)
    if rules.maximum is not None:
        yield kind(rules.maximum + 1)
    if rules.exclusive_minimum is not None:
        yield kind(rules.exclusive_minimum)
    if rules.pattern is not None:
        yield "not a match"
    if rules.required:
        yield ""


def rule_cases() -> Iterator[tuple[str, str, object]]:
    for role, cls in CONFIGS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in FROM_TEMPLATES[role]:
                for value in violations(f.metadata["rules"], hints[f.name]):
                    yield role, f.name, value


CASES = list(rule_cases())


def test_every_kind_of_rule_is_exercised():
    kinds = {type(value) for _, _, value in CASES} | {value for _, _, value in CASES if isinstance(value, str)}
    assert {int, float, "no-such-choice", "not a match", ""} <= kinds


@pytest.mark.parametrize(("role", "name", "value"), CASES, ids=[f"{r}.{n}={v!r}" for r, n, v in CASES])
def test_each_rule_is_enforced_by_the_service_and_by_helm(chart, role, name, value):
    with pytest.raises(InvalidArgument) as refused:
        load_config(CONFIGS[role], [*VALID_FLAGS[role], f"--{flag_name(name)}={value}"], env={})
    assert refused.value.field == name
    key = render.camel(name)
    if value == "" and key in render.CHART_FILLED[role]:
        return  # the chart fills an empty value in before the service sees it
    assert f"/{role}/config/{key}" in refused_by_helm(chart, role, key, value)


FLOAT_FIELDS = [
    (role, f.name)
    for role, cls in CONFIGS.items()
    for f in dataclasses.fields(cls)
    if get_type_hints(cls)[f.name] is float
]


@pytest.mark.parametrize(("role", "name"), FLOAT_FIELDS, ids=[f"{r}.{n}" for r, n in FLOAT_FIELDS])
def test_the_service_refuses_a_number_that_is_not_finite(role, name):
    """JSON has no NaN or infinity, so this one is the service's alone: a flag or variable may say "nan"."""
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(InvalidArgument, match="finite") as refused:
            load_config(CONFIGS[role], [*VALID_FLAGS[role], f"--{flag_name(name)}={value}"], env={})
        assert refused.value.field == name
