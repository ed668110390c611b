"""The load test's report names what it ran on (model, commit, machine, load average, command) and its plots
draw the SLOs and a throughput-latency curve; checked on a fake report, with no stack and no timing."""

import json

import pytest

from loadtest import environment as env_module
from loadtest.__main__ import environment, parse_args
from loadtest.report import Slo, caption, figures, write_report

matplotlib = pytest.importorskip("matplotlib")

SLO = Slo(ttft_ms=1000.0, tpot_ms=100.0)


def fake_run(concurrency: int, spec: str, throughput: float, latency: float) -> dict:
    dist = {"count": 4, "mean": latency, "p50": latency, "p90": latency * 1.5, "p99": latency * 2}
    return {
        "name": f"c{concurrency}-spec-{spec}",
        "load": {"concurrency": concurrency, "rate": None},
        "slo_ms": {"ttft_ms": SLO.ttft_ms, "tpot_ms": SLO.tpot_ms, "e2e_ms": None},
        "output_token_throughput": throughput,
        "goodput": {"requests_per_s": 1.0},
        "ttft_ms": dist,
        "tpot_ms": {k: (v / 10 if k != "count" else v) for k, v in dist.items()},
        "e2e_ms": {k: (v * 10 if k != "count" else v) for k, v in dist.items()},
        "samples_ms": {key: [latency, latency * 2] for key in ("ttft", "tpot", "itl", "e2e")},
    }


ENVIRONMENT = {
    "command": "python -m loadtest --local-stack --sweep",
    "commit": "abc1234-dirty",
    "dirty": True,
    "modified": ["README.md"],
    "model": {"name": "reference-model", "architecture": "llama", "layers": 16, "hidden": 256, "dtype": "bfloat16"}
    | {"exit_layer": 2, "exit_head": ".cache/head"},
    "machine": {"cpu": "Fake CPU 9000", "cores_available": 2, "memory_gb": 8.0, "cpu_flags": {"avx512_bf16": True}},
    "load_average": {"start": [0.42, 1.0, 1.0], "end": [2.5, 1.2, 1.0]},
    "slo_ms": {"ttft_ms": SLO.ttft_ms, "tpot_ms": SLO.tpot_ms, "e2e_ms": None},
    "time_start": "2026-01-01T00:00:00+0000",
}


@pytest.fixture()
def report():
    levels = [(c, spec) for c in (1, 2, 4) for spec in ("on", "off")]
    runs = [fake_run(c, spec, 20.0 * c + (10 if spec == "off" else 0), 50.0 * c) for c, spec in levels]
    yield {"environment": ENVIRONMENT, "runs": runs}
    matplotlib.pyplot.close("all")


def slo_lines(ax) -> dict[str, tuple]:
    """The SLO lines of an axes: label -> (xdata, ydata)."""
    lines = [line for line in ax.lines if "SLO" in line.get_label()]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in lines}


def test_plots_name_model_commit_machine_and_load(report):
    figs = figures(report)
    assert set(figs) == {"latency_cdf", "vs_concurrency", "throughput_latency"}
    for fig in figs.values():
        title = fig._suptitle.get_text()
        for text in ("reference-model", "exit N=2", "bfloat16", "abc1234-dirty", "Fake CPU 9000", "2 cores", "0.42"):
            assert text in title, (text, title)


def test_slo_lines_on_the_plots(report):
    figs = figures(report)
    ttft, tpot = figs["vs_concurrency"].axes[1], figs["vs_concurrency"].axes[2]
    assert slo_lines(ttft) == {"SLO 1000 ms": ([0, 1], [1000.0, 1000.0])}  # horizontal: y fixed at the bound
    assert slo_lines(tpot) == {"SLO 100 ms": ([0, 1], [100.0, 100.0])}
    cdf_ttft, cdf_tpot, cdf_itl, cdf_e2e = figs["latency_cdf"].axes
    assert slo_lines(cdf_ttft) == {"SLO 1000 ms": ([1000.0, 1000.0], [0, 1])}  # vertical on a CDF
    assert slo_lines(cdf_tpot) == {"SLO 100 ms": ([100.0, 100.0], [0, 1])}
    assert slo_lines(cdf_itl) == {} and slo_lines(cdf_e2e) == {}  # no e2e SLO given
    assert "TTFT <= 1000 ms, TPOT <= 100 ms" in figs["vs_concurrency"].axes[3].get_title()


def test_throughput_latency_curve(report):
    ttft, tpot, e2e = figures(report)["throughput_latency"].axes
    assert slo_lines(ttft) == {"SLO 1000 ms": ([0, 1], [1000.0, 1000.0])}
    assert slo_lines(tpot) == {"SLO 100 ms": ([0, 1], [100.0, 100.0])}
    assert slo_lines(e2e) == {}
    curves = {line.get_label(): line for line in tpot.lines if "SLO" not in line.get_label()}
    assert set(curves) == {"p50, spec on", "p99, spec on", "p50, spec off", "p99, spec off"}
    on = curves["p50, spec on"]
    assert list(on.get_xdata()) == [20.0, 40.0, 80.0]  # output tokens/s of c1, c2, c4
    assert list(on.get_ydata()) == [5.0, 10.0, 20.0]  # their TPOT p50
    assert list(curves["p99, spec off"].get_xdata()) == [30.0, 50.0, 90.0]


def test_write_report_writes_the_json_and_three_plots(report, tmp_path):
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == [
        "loadtest.json",
        "loadtest_latency_cdf.png",
        "loadtest_vs_concurrency.png",
        "loadtest_throughput_latency.png",
    ]
    assert json.loads(paths[0].read_text())["environment"] == ENVIRONMENT


def test_caption_of_a_report_without_environment():
    assert caption(None) == "model unknown | commit unknown\nmachine unknown"


def test_environment_names_model_commit_machine_load_and_command(tmp_path, monkeypatch):
    model = tmp_path / "my-model"
    model.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 100, "dtype": "float32"}
    (model / "config.json").write_text(json.dumps(config))
    argv = ["--local-stack", "--model-dir", str(model), "--exit-layer", "3", "--dtype", "bfloat16"]
    argv += ["--requests", "2", "--slo", "ttft=500,tpot=40"]
    args = parse_args(argv)
    monkeypatch.setattr("loadtest.__main__.load_average", lambda: [7.0, 6.0, 5.0])
    started = {"machine": env_module.machine(), "load_average": [0.5, 0.6, 0.7], "time": "t0", "clock": 0.0}
    env = environment(args, argv, started, ["my-model"])
    assert env["command"] == "python -m loadtest " + " ".join(argv)
    assert env["model"] | {"exit_head": None} == {
        "name": "my-model",
        "model_dir": str(model),
        "exit_layer": 3,
        "exit_head": None,
        "architecture": "llama",
        "layers": 4,
        "hidden": 64,
        "vocab_size": 100,
        "parameters": None,
        "dtype": "bfloat16",
        "dtype_stored": "float32",
        "served_model_names": ["my-model"],
    }
    assert env["load_average"] == {"start": [0.5, 0.6, 0.7], "end": [7.0, 6.0, 5.0]}
    assert env["slo_ms"] == {"ttft_ms": 500.0, "tpot_ms": 40.0, "e2e_ms": None}
    assert env["stack"]["local"] is True and env["stack"]["state_store"] == "memory"
    assert isinstance(env["dirty"], bool) and isinstance(env["modified"], list)
    assert env["commit"].endswith("-dirty") == env["dirty"]
    machine = env["machine"]
    assert {"cpu", "cpu_flags", "cores_available", "memory_gb"} <= machine.keys()
    assert {"avx512_bf16", "amx_bf16", "amx_tile"} <= machine["cpu_flags"].keys()
