"""`eesd sweep` on a tiny model: untrained and quickly distilled exit layers, held-out prompts, the recommendation."""

import json
from pathlib import Path

import pytest

from bench.prompts import PromptSet, load_prompt_set
from bench.sweep import SweepConfig, default_exit_layers, distill_config, model_stamp, recommend, run_sweep
from eesd.checkpoint import load_config
from eesd.cli import main
from eesd.distill import load_prompts
from eesd.errors import InvalidArgument

QUICK = ["--num-prompts", "2", "--max-new-tokens", "8", "--repetitions", "2", "--dtype", "float32", "--threads", "1"]


def test_default_exit_layers_spread_over_the_cheap_depth():
    assert default_exit_layers(16) == [1, 2, 3, 4, 6]
    assert default_exit_layers(32) == [1, 2, 3, 4, 6, 8, 12]
    assert default_exit_layers(4) == [1]
    assert default_exit_layers(2) == [1]


def test_recommend_takes_the_highest_median_speedup():
    rows = {1: {"speedup_vs_ours_ar": 1.4}, 2: {"speedup_vs_ours_ar": 1.9}, 4: {"speedup_vs_ours_ar": 1.7}}
    assert recommend(rows) == 2


def test_cli_sweep_untrained(tiny_models, tmp_path, capsys):
    args = ["sweep", "--model", str(tiny_models["llama"]), "--exit-layers", "1,3", "--untrained", *QUICK]
    assert main([*args, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    rows = result["exit_layers"]
    assert set(rows) == {"1", "3"}
    for row in rows.values():
        assert row["exit_head"] is None and "distill" not in row
        assert len(row["speedup_vs_ours_ar_per_repetition"]) == 2 and row["speedup_vs_ours_ar"] > 0
        assert 1.0 <= row["mean_accepted_tokens"] and 0.0 <= row["acceptance_rate"] <= 1.0
        assert row["same_tokens_as_ours_ar"] == 1.0  # fp32 greedy: every drafter lossless
    best = max(rows, key=lambda n: rows[n]["speedup_vs_ours_ar"])
    assert result["recommended"]["exit_layer"] == int(best)
    assert result["config"]["prompts"]["source"] == "random(seed=0)"
    assert result["load_average"]["start"] and result["source_tree"]["commit"]
    assert not (tmp_path / "cache").exists()  # nothing distilled
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Recommended: **N = {best}**" in table and "| 3 |" in table.replace("**", "")


def _sweep(model_dir, tmp_path, **kw) -> SweepConfig:
    prompts = PromptSet("random(seed=0)", [0], [None], [[5, 6, 7, 8, 9]])
    base = dict(
        model_dir=str(model_dir),
        exit_layers=[1, 2],
        prompts=prompts,
        max_new_tokens=6,
        repetitions=1,
        dtype="float32",
        threads=1,
        distill_steps=3,
        distill_num_prompts=8,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        plots=False,
    )
    return SweepConfig(**{**base, **kw})


def test_sweep_distills_once_per_n_and_reuses_the_heads(tiny_models, tmp_path):
    cfg = _sweep(tiny_models["qwen2"], tmp_path)
    first = run_sweep(cfg, progress=False)
    stamp = model_stamp(cfg.model_dir)
    heads = {n: distill_config(cfg, n, stamp).out_dir for n in (1, 2)}
    assert heads[1] != heads[2]
    for n, row in first["exit_layers"].items():
        assert row["exit_head"] == heads[int(n)] and row["cached"] is False
        assert set(row["distill"]["after"]) == {"kl", "agreement", "overlap"}
    # The target's continuations do not depend on N: one corpus for both.
    corpora = [json.loads((Path(h) / "checkpoints" / "corpus.json").read_text()) for h in heads.values()]
    assert corpora[0] == corpora[1]
    again = run_sweep(cfg, progress=False)
    assert all(row["cached"] for row in again["exit_layers"].values())
    other = distill_config(_sweep(tiny_models["qwen2"], tmp_path, distill_steps=4), 1, stamp).out_dir
    assert other != heads[1]  # other settings, another cache entry


def test_sweep_refuses_distillation_prompts(tiny_models, tmp_path):
    cfg = _sweep(tiny_models["llama"], tmp_path, exit_layers=[1])
    distilled = load_prompts(distill_config(cfg, 1, model_stamp(cfg.model_dir)), load_config(cfg.model_dir).vocab_size)
    leaked = PromptSet("random(seed=0)", [0, 1], [None, None], [[5, 6, 7], distilled[3]])
    with pytest.raises(InvalidArgument, match="held-out"):
        run_sweep(_sweep(tiny_models["llama"], tmp_path, exit_layers=[1], prompts=leaked), progress=False)


def test_cli_sweep_leaves_out_the_benchmarks_evaluation_prompts(tiny_models, tmp_path):
    rows = [{"path": f"f{i // 2}.py", "prompt_ids": [5 + i, 6, 7, 8]} for i in range(16)]
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["sweep", "--model", str(tiny_models["llama"]), "--exit-layers", "1", "--untrained", *QUICK]
    args += ["--prompts", str(prompts), "--num-prompts", "6", "--skip-evaluation-prompts", "4"]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-plots", "--quiet"]) == 0
    used = json.loads((tmp_path / "out" / "sweep.json").read_text())["config"]["prompts"]
    evaluation = load_prompt_set(str(prompts), str(tiny_models["llama"]), 4)  # what eesd bench --num-prompts 4 takes
    assert len(used["indices"]) == 6 and not set(used["indices"]) & set(evaluation.indices)
    assert not set(used["paths"]) & set(evaluation.paths)
