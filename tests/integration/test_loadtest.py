"""The load generator against a LocalStack it starts: a bounded run (closed loop with speculation on and off,
one open-loop rate) finishes without errors and writes a consistent report; through the stack's HTTP API
(--protocol http) the report has the same shape and agrees with the servers' metrics."""

import json

import pytest

from loadtest.__main__ import main
from loadtest.report import Slo, distribution

REQUESTS, MAX_NEW_TOKENS = 4, 8
SPEC_KEYS = ("rounds", "draft_tokens", "accepted_tokens", "k_histogram", "acceptance_rate", "mean_accepted_tokens")


@pytest.fixture(scope="module")
def report(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest")
    argv = ["--local-stack", "--model-dir", str(tiny_models["llama"]), "--exit-layer", "1"]
    argv += ["--log-dir", str(out / "logs"), "--concurrency", "1,2", "--rate", "20", "--speculation", "on,off"]
    # Beta-TS as the request names it (not the server's load-aware default, which on this tiny model with an
    # untrained exit layer rightly drafts nothing), so the speculation counters have drafts to account for.
    argv += ["--policy", "beta-ts"]
    argv += ["--requests", str(REQUESTS), "--max-new-tokens", str(MAX_NEW_TOKENS), "--warmup", "1"]
    main([*argv, "--prompts", str(_prompts(out)), "--slo", "ttft=60000,tpot=60000", "--out", str(out)])
    return out, json.loads((out / "loadtest.json").read_text())


def _prompts(out):
    path = out / "prompts.jsonl"
    path.write_text('{"prompt": [11, 12, 13, 14]}\n[5, 6, 7, 8, 9]\n')
    return path


def test_report_covers_every_run_without_errors(report):
    out, data = report
    names = [r["name"] for r in data["runs"]]
    assert names == ["c1-spec-on", "c1-spec-off", "c2-spec-on", "c2-spec-off", "r20-spec-on", "r20-spec-off"]
    for suffix in ("latency_cdf", "vs_concurrency", "throughput_latency"):
        assert (out / f"loadtest_{suffix}.png").stat().st_size > 1000
    for run in data["runs"]:
        assert run["requests"] == {"issued": REQUESTS, "completed": REQUESTS, "failed": 0, "errors": {}}
        assert run["speculation_server"]["grpc_codes"].keys() == {"OK"}


def test_report_names_model_commit_machine_load_and_command(report, tiny_models):
    env = report[1]["environment"]
    assert env["command"].startswith("python -m loadtest --local-stack --model-dir")
    model = env["model"]
    assert model["model_dir"] == str(tiny_models["llama"]) and model["name"] == tiny_models["llama"].name
    assert model["exit_layer"] == 1 and model["dtype"] == "float32" and model["layers"] > 1
    assert model["served_model_names"] == [model["name"]]  # the vllm: metrics' model_name label
    assert len(env["commit"]) >= 7 and env["commit"].endswith("-dirty") == env["dirty"]
    assert {"cpu", "cpu_flags", "cores_available", "memory_gb"} <= env["machine"].keys()
    assert {"avx512_bf16", "amx_bf16"} <= env["machine"]["cpu_flags"].keys()
    assert len(env["load_average"]["start"]) == len(env["load_average"]["end"]) == 3
    assert env["slo_ms"] == {"ttft_ms": 60000.0, "tpot_ms": 60000.0, "e2e_ms": None}
    for run in report[1]["runs"]:
        assert len(run["load_average"]["start"]) == 3


def test_token_counts_equal_what_the_sdk_received(report):
    for run in report[1]["runs"]:
        tokens = run["tokens"]
        assert tokens["output"] == tokens["output_in_results"] == tokens["output_in_summaries"]
        assert tokens["output"] == REQUESTS * MAX_NEW_TOKENS  # stop_on_eos is off: every request runs to length
        assert tokens["chunks"] == run["tokens_per_chunk"]["count"] == run["speculation_client"]["rounds"]
        assert run["tokens_per_chunk"]["mean"] == pytest.approx(tokens["output"] / tokens["chunks"])
        assert run["output_token_throughput"] == pytest.approx(tokens["output"] / run["duration_s"])
        assert run["request_throughput"] == pytest.approx(REQUESTS / run["duration_s"])


def test_latency_fields_are_consistent(report):
    for run in report[1]["runs"]:
        for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            d = run[key]
            assert d["count"] == REQUESTS
            assert 0 < d["p50"] <= d["p90"] <= d["p99"]
        assert run["itl_ms"]["count"] == run["tokens"]["chunks"] - REQUESTS
        assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
        assert run["goodput"]["good_requests"] == REQUESTS  # the SLO here is a minute


def test_speculation_scraped_from_the_servers_equals_the_summaries(report):
    for run in report[1]["runs"]:
        client, server = run["speculation_client"], run["speculation_server"]
        for key in SPEC_KEYS:
            assert server[key] == pytest.approx(client[key]), key
        assert server["acceptance_by_position"] == pytest.approx(client["acceptance_by_position"])
        if run["name"].endswith("off"):
            assert server["draft_tokens"] == 0 and server["k_histogram"] == {"0": client["rounds"]}
            assert run["tokens_per_chunk"]["mean"] == 1.0
        else:
            assert server["draft_tokens"] > 0


def test_slo_and_distribution_helpers():
    slo = Slo.parse("ttft=100,tpot=10")
    assert slo.met({"ttft": 99.0, "tpot": 10.0, "e2e": 1e9})
    assert not slo.met({"ttft": 101.0, "tpot": 1.0, "e2e": 1.0})
    assert not slo.met({"ttft": None, "tpot": 1.0, "e2e": 1.0})
    with pytest.raises(ValueError):
        Slo.parse("latency=3")
    d = distribution(list(range(1, 101)))
    assert d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01) and d["count"] == 100
    assert distribution([])["p50"] is None


@pytest.fixture(scope="module")
def http_report(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest-http")
    argv = ["--local-stack", "--protocol", "http", "--model-dir", str(tiny_models["llama"]), "--exit-layer", "1"]
    argv += ["--log-dir", str(out / "logs"), "--concurrency", "2", "--speculation", "on,off", "--policy", "beta-ts"]
    argv += ["--requests", str(REQUESTS), "--max-new-tokens", str(MAX_NEW_TOKENS), "--warmup", "1"]
    main([*argv, "--prompts", str(_prompts(out)), "--slo", "ttft=60000,tpot=60000", "--out", str(out)])
    return json.loads((out / "loadtest.json").read_text())


def _shape(run: dict) -> dict:
    """A run's fields and, for those that are objects, their fields."""
    return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in run.items()}


def test_the_http_api_gives_a_report_of_the_same_shape_and_numbers(report, http_report):
    assert http_report["environment"]["stack"]["protocol"] == "http"
    assert http_report["environment"]["stack"]["target"].startswith("http://127.0.0.1:")
    grpc_run = report[1]["runs"][0]
    for run in http_report["runs"]:
        assert run["requests"] == {"issued": REQUESTS, "completed": REQUESTS, "failed": 0, "errors": {}}
        tokens, client, server = run["tokens"], run["speculation_client"], run["speculation_server"]
        assert tokens["output"] == tokens["output_in_results"] == tokens["output_in_summaries"]
        assert tokens["output"] == REQUESTS * MAX_NEW_TOKENS
        assert tokens["chunks"] == client["rounds"] == server["rounds"]  # one SSE chunk per round, as on gRPC
        for key in ("draft_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_tokens"):
            assert server[key] == pytest.approx(client[key]), key
        assert server["http_statuses"] == {"200": REQUESTS}
        # What only the gRPC summaries carry is None on the client's side; the servers' metrics still have it.
        assert client["k_histogram"] is client["acceptance_by_position"] is client["round_time_ms"] is None
        assert sum(server["k_histogram"].values()) == server["rounds"]
        assert _shape(run) == _shape(grpc_run)
    assert http_report["runs"][1]["tokens_per_chunk"]["mean"] == 1.0  # speculation off: one token per round
