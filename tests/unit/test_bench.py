"""Benchmark smoke run on a tiny model: one repetition of every method writes valid JSON and PNGs."""

import json
import subprocess

import pytest

from bench.prompts import load_prompt_set, random_prompts
from bench.report import markdown
from bench.suite import BenchConfig, run_suite
from eesd.cli import main
from eesd.corpus import spread
from eesd.errors import InvalidArgument
from loadtest import environment


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
    headline = on_disk["headline"]
    # No tuning prompts: the headline is the fastest default policy on the evaluation prompts, and says so.
    assert headline["method"] in {"ours-heuristic", "ours-beta-ts", "ours-calibration-ts"}
    assert headline["chosen_on"] == "evaluation prompts" and headline["tuned"] == {}
    assert headline["speedup_vs_hf_generate"] == greedy[headline["method"]]["speedup_vs_hf_generate"]
    assert {"speedup_vs_best_hf_assisted", "best_fixed_k_oracle"} <= set(headline)
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


def test_prompt_sets_are_spread_and_disjoint(tmp_path):
    rows = [{"path": f"f{i // 2}.py", "prompt_ids": [10 + i, 11 + i]} for i in range(12)]  # two rows per file
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert spread(12, 4) == [0, 4, 7, 11]
    assert spread(5, 3, frozenset({0, 4})) == [1, 2, 3]
    evaluation = load_prompt_set(str(path), "unused", 3)
    assert evaluation.indices == [0, 6, 11] and evaluation.paths == ["f0.py", "f3.py", "f5.py"]
    tuning = load_prompt_set(str(path), "unused", 3, [evaluation])
    assert not set(tuning.paths) & set(evaluation.paths)  # not even a neighbouring row of the same file
    assert tuning.indices == [2, 4, 9] and tuning.record()["lengths"] == [2, 2, 2]
    with pytest.raises(InvalidArgument, match="no prompts left"):
        load_prompt_set(str(path), "unused", 3, [load_prompt_set(str(path), "unused", 12)])
    randoms = random_prompts(100, 3, seed=0)
    assert random_prompts(100, 3, seed=0, exclude=[randoms]).ids != randoms.ids


def test_policy_options_are_tuned_on_other_prompts(tiny_models, tmp_path, capsys):
    """The tuning run picks each policy's best option set on the tuning prompts; the evaluation shows the
    defaults and the picks labelled tuned; the headline policy (default options) is chosen on the tuning prompts."""
    args = ["bench", "--model", str(tiny_models["llama"]), "--exit-layer", "3", "--num-prompts", "2"]
    args += ["--max-new-tokens", "6", "--repetitions", "1", "--temperatures", "0", "--fixed-ks", "2", "--no-hf"]
    args += ["--policies", "heuristic,beta-ts,calibration-ts", "--dtype", "float32", "--threads", "1"]
    args += ["--tune-policies", "beta-ts[draft_cost=0.25],beta-ts[alpha=4],calibration-ts[min_accept=0.25]"]
    assert main([*args, "--out", str(tmp_path), "--quiet", "--name", "tuned"]) == 0
    result = json.loads((tmp_path / "tuned.json").read_text())
    sources = result["config"]["prompt_sources"]
    assert sources["evaluation"]["source"] == "random(seed=0)" and sources["tuning"]["source"] == "random(seed=1)"
    tuning = result["tuning"]["0.0"]
    tuned_rows = tuning["results"]
    assert {"ours-ar", "ours-beta-ts", "ours-beta-ts[alpha=4]", "ours-calibration-ts[min_accept=0.25]"} <= set(
        tuned_rows
    )
    for policy in ("beta-ts", "calibration-ts"):
        candidates = {r["label"]: r["speedup_vs_ours_ar"] for r in tuned_rows.values() if r["policy"] == policy}
        assert tuning["chosen"][policy] == max(candidates, key=candidates.get)
    greedy = result["results"]["0.0"]
    tuned = {r["label"] for r in greedy.values() if r["tuned"]}
    assert tuned == {f"{spec} (tuned)" for spec in tuning["chosen"].values() if "[" in spec}
    assert {"ours-heuristic", "ours-beta-ts", "ours-calibration-ts"} <= set(greedy)  # the defaults stay
    headline = result["headline"]
    defaults = {
        n: tuned_rows[n]["speedup_vs_ours_ar"] for n in ("ours-heuristic", "ours-beta-ts", "ours-calibration-ts")
    }
    assert headline["method"] == max(defaults, key=defaults.get) and headline["chosen_on"] == "tuning prompts"
    assert set(headline["tuned"]) == {n for n, r in greedy.items() if r["tuned"]}
    assert "Tuning, greedy" in capsys.readouterr().out


def test_tuning_prompts_must_differ_from_evaluation_prompts(tiny_models, tmp_path):
    cfg = BenchConfig(
        model_dir=str(tiny_models["llama"]),
        exit_layer=2,
        exit_head=None,
        prompts=[[5, 6, 7], [8, 9]],
        tune_prompts=[[8, 9]],
        tune_policies=["beta-ts[alpha=4]"],
        out_dir=str(tmp_path),
        include_hf=False,
    )
    with pytest.raises(InvalidArgument, match="also evaluation prompts"):
        run_suite(cfg, progress=False)


def test_source_tree_leaves_out_the_results_a_run_rewrites(tmp_path, monkeypatch):
    """`make bench | tee` truncates the tracked report before the run: that alone does not make the code dirty."""
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "results").mkdir()
    for name in ("code.py", "results/report.md"):
        (tmp_path / name).write_text("v1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "report.md").write_text("")
    assert environment.source_tree("results")["dirty"] is False
    assert environment.source_tree()["modified"] == ["results/report.md"]
    (tmp_path / "code.py").write_text("v2\n")
    tree = environment.source_tree("results")
    assert tree["modified"] == ["code.py"] and tree["commit"].endswith("-dirty")
