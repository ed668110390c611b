"""The chart's per-role `config` blocks mirror the services' config dataclasses field for field, so
every setting a service has is a Helm value (and an EESD_* variable), and no value is silently ignored."""

import json

import pytest
import yaml
from deploy_helpers import CONFIGS, FROM_TEMPLATES, ROOT, SERVICE_FIELDS, release_for, render

from serving.config import env_name

CHART = ROOT / "deploy" / "helm" / "eesd"


@pytest.mark.parametrize("role", CONFIGS)
def test_values_and_schema_mirror_the_config_dataclass(role):
    values = yaml.safe_load((CHART / "values.yaml").read_text())[role]["config"]
    schema = json.loads((CHART / "values.schema.json").read_text())["$defs"][f"{role}Config"]["properties"]
    expected = {render.camel(name) for name in SERVICE_FIELDS[role]}
    assert set(values) == expected
    assert set(schema) == expected


@pytest.mark.parametrize("role", CONFIGS)
def test_template_provided_fields_are_rendered(role):
    """auth_token (from the Secret) and node_id (the pod name) reach the container as EESD_* variables."""
    container = release_for(None).pod_spec(role)["containers"][0]
    env = {e["name"] for e in container.get("env", [])}
    assert {env_name(name) for name in FROM_TEMPLATES[role]} <= env
