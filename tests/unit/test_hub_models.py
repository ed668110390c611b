"""A model named by its Hugging Face id (eesd.fetch.resolve_model, the rule behind every --model / model_dir):
downloaded into huggingface_hub's cache from a stand-in hub (tests/hub.py), served from that cache offline,
and, when it cannot be had, an error that names the id, from the CLI and as a service's startup failure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eesd import fetch
from eesd.cli import main
from eesd.errors import InvalidArgument
from serving.local_stack import free_port
from tests.hub import COMMIT, REPO, Server, hub_env, hub_routes

# fp32: greedy tokens of a random model tie in bf16, and the comparison is with the local directory's run.
GENERATE = ["generate", "--exit-layer", "2", "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--dtype", "float32"]
MISSING = "tiny-org/missing"


def eesd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import."""
    return subprocess.run(
        [sys.executable, "-m", "eesd.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        ("org/name", ("org/name", None)),
        ("Org-1/name.v2_x@v1.0", ("Org-1/name.v2_x", "v1.0")),
        (f"hf://org/name@{COMMIT}", ("org/name", COMMIT)),
        ("/models/reference", None),
        ("org/name/extra", None),
        ("name", None),
        ("https://host/org/name", None),
    ],
)
def test_hub_ids_are_org_name_and_an_optional_revision(source, parsed):
    assert fetch.hub_id(source) == parsed


def test_a_local_directory_is_used_as_it_is_and_anything_else_must_be_an_id(tiny_models, tmp_path):
    assert fetch.resolve_model(str(tiny_models["llama"])) == tiny_models["llama"]
    with pytest.raises(InvalidArgument, match="model_dir: '/no/such/dir' is neither a directory nor"):
        fetch.resolve_model("/no/such/dir", "model_dir")
    with pytest.raises(InvalidArgument, match="model_dir: 'org--x/name'"):  # a name the hub refuses: before any request
        fetch.resolve_model("org--x/name", "model_dir")


@pytest.mark.slow  # ~40 s: four `eesd generate` processes, each loading torch
def test_generate_from_a_hub_id_equals_the_local_directory_and_then_runs_offline(tiny_models, tmp_path, capsys):
    model, hf_home = tiny_models["llama"], tmp_path / "hf-home"
    assert main([*GENERATE, "--model", str(model), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)["token_ids"]
    server = Server(hub_routes(model, revisions=("main", "v1")))
    try:
        latest = eesd([*GENERATE, "--model", REPO, "--json"], hub_env(server.url, hf_home))
        tagged = eesd([*GENERATE, "--model", f"{REPO}@v1", "--json"], hub_env(server.url, hf_home))
    finally:
        server.close()
    for run in (latest, tagged):
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["token_ids"] == local
    # One snapshot in the cache, of the checkpoint's files only (the card and the .bin weights skipped)...
    (snapshot,) = (hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots").iterdir()
    assert snapshot.name == COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in Path(model).iterdir())
    # ...which serves both names with the hub gone and HF_HUB_OFFLINE set.
    for name in (REPO, f"{REPO}@v1"):
        offline = eesd([*GENERATE, "--model", name, "--json"], hub_env(server.url, hf_home, offline=True))
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout)["token_ids"] == local


def test_an_id_that_cannot_be_had_is_an_error_naming_it(tiny_models, tmp_path):
    routes = hub_routes(tiny_models["llama"])
    # What the hub answers for a repository it does not have (or hides: private without a token).
    routes[f"/api/models/{MISSING}/revision/main"] = (404, {"X-Error-Code": "RepoNotFound"}, b"{}")
    routes[f"/api/models/{REPO}/revision/no-such-tag"] = (404, {"X-Error-Code": "RevisionNotFound"}, b"{}")
    server = Server(routes)
    try:
        unknown = eesd([*GENERATE, "--model", MISSING], hub_env(server.url, tmp_path / "hf"))
        revision = eesd([*GENERATE, "--model", f"{REPO}@no-such-tag"], hub_env(server.url, tmp_path / "hf"))
    finally:
        server.close()
    offline = eesd([*GENERATE, "--model", REPO], hub_env(server.url, tmp_path / "empty", offline=True))
    unreachable = eesd([*GENERATE, "--model", REPO], hub_env(server.url, tmp_path / "empty"))  # the server is closed
    for run, named, why in (
        (unknown, MISSING, "answered 404"),
        (revision, f"{REPO}@no-such-tag", "has no revision 'no-such-tag'"),
        (offline, REPO, "HF_HUB_OFFLINE is set"),
        (unreachable, REPO, "cannot be reached"),
    ):
        assert run.returncode == 2, run.stderr
        assert f"eesd: error: {named}: " in run.stderr and why in run.stderr
        assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "service",
    [["controller", "--verifiers", "127.0.0.1:1"], ["verifier_service"], ["drafter_service", "--exit-layer", "1"]],
    ids=lambda s: s[0],
)
def test_a_service_whose_model_cannot_be_had_fails_to_start_naming_it(service, tmp_path):
    args = [*service, "--model-dir", MISSING, "--port", str(free_port()), "--metrics-port", "0", "--log-format", "text"]
    if service[0] == "drafter_service":
        args += ["--verifiers", "127.0.0.1:1"]
    run = subprocess.run(
        [sys.executable, "-m", *args],
        env=hub_env("http://127.0.0.1:1", tmp_path / "hf", offline=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"did not start: {MISSING}: not in the Hugging Face cache" in run.stderr
    assert "Traceback" not in run.stderr
