"""Benchmark smoke run on a tiny model: one repetition of every method writes valid JSON and PNGs."""

import json

import pytest

from bench.report import markdown
from bench.suite import BenchConfig, run_suite
from eesd.cli import main


@pytest.fixture(scope="module")
def smoke(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(
        model_dir=str(tiny_models["llama"]),
        exit_layer=2,
        exit_head=None,
        prompts=[[5, 6, 7, 8], [9, 10, 11]],
        name="smoke",
        out_dir=str(out),
        max_new_tokens=10,
        repetitions=1,
        temperatures=[0.0, 0.7],
        dtype="float32",
        k_max=3,
        fixed_ks=[1, 3],
        threads=1,
    )
    return out, run_suite(cfg, progress=False)


def test_smoke_writes_json_and_pngs(smoke):
    out, result = smoke
    on_disk = json.loads((out / "smoke.json").read_text())
    assert on_disk["results"].keys() == {"0.0", "0.7"}
    greedy = on_disk["results"]["0.0"]
    expected = {"hf-generate", "hf-assisted-ee", "hf-assisted-ee-heuristic", "ours-ar", "ours-fixed-1", "ours-fixed-3"}
    assert expected | {"ours-heuristic", "ours-threshold", "ours-beta-ts", "ours-calibration-ts"} == set(greedy)
    for row in greedy.values():
        assert row["tokens_per_second"] > 0
        assert row["speedup_vs_hf_generate"] > 0 and row["speedup_vs_ours_ar"] > 0
    assert greedy["ours-ar"]["speedup_vs_ours_ar"] == pytest.approx(1.0)
    fixed = greedy["ours-fixed-3"]
    assert fixed["drafted_histogram"].keys() <= {"0", "1", "2", "3"}
    assert len(fixed["acceptance_by_position"]) == 3 and all(0 <= a <= 1 for a in fixed["acceptance_by_position"])
    assert 1.0 <= fixed["mean_accepted_tokens"] <= 4.0
    assert fixed["draft_ms_per_round"] > 0 and fixed["verify_ms_per_round"] > 0
    # fp32: speculation is lossless, and HF generate decodes the same tokens
    assert all(row["same_tokens_as_ours_ar"] == 1.0 for row in greedy.values())
    assert {"best_method", "best_speedup_vs_hf_generate", "best_speedup_vs_best_hf_assisted"} <= set(
        on_disk["headline"]
    )
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fixed k=3 |" in markdown(on_disk)


def test_cli_bench_without_hf(tiny_models, tmp_path, capsys):
    args = ["bench", "--model", str(tiny_models["qwen2"]), "--exit-layer", "1", "--num-prompts", "1"]
    args += ["--max-new-tokens", "6", "--repetitions", "1", "--temperatures", "0", "--fixed-ks", "2", "--no-hf"]
    args += ["--policies", "beta-ts", "--dtype", "float32", "--threads", "1", "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--name", "cli"]) == 0
    assert "| beta-ts |" in capsys.readouterr().out
    result = json.loads((tmp_path / "cli.json").read_text())
    assert set(result["results"]["0.0"]) == {"ours-ar", "ours-fixed-2", "ours-beta-ts"}
    assert (tmp_path / "cli-greedy-k-sweep.png").is_file()
