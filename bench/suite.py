"""The benchmark suite: every method on the same model and prompts, interleaved, medians over repetitions.

Within a repetition the methods run prompt by prompt in a rotating order, so slow drift of a shared
machine hits every method alike; each repetition yields one tokens/s per method (tokens over seconds
summed across the prompts) and one speedup per method against each baseline of the same repetition.
Reported: medians over repetitions of both, and the speculation statistics pooled over all runs.
"""

import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from bench.methods import Method, Run, Runners, default_methods
from eesd import hardware
from loadtest import environment

POLICIES = ["heuristic", "threshold", "beta-ts", "calibration-ts"]
HF_ASSISTED = [
    # transformers' own defaults for assisted generation: 20 drafts, constant schedule, threshold 0.4
    {"name": "", "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant"},
    # the schedule of our heuristic baseline, started at k_max
    {"name": "heuristic", "num_assistant_tokens": 8, "num_assistant_tokens_schedule": "heuristic_transient"},
]


@dataclass
class BenchConfig:
    model_dir: str
    exit_layer: int
    exit_head: str | None
    prompts: list[list[int]]
    name: str = "bench"
    out_dir: str = "bench/results"
    max_new_tokens: int = 96
    repetitions: int = 3
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7])
    dtype: str = "auto"  # eesd.hardware's rule; the result records what it resolved to
    k_max: int = 8
    fixed_ks: list[int] = field(default_factory=lambda: list(range(1, 9)))
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    hf_assisted: list[dict] = field(default_factory=lambda: [dict(v) for v in HF_ASSISTED])
    include_hf: bool = True
    seed: int = 0
    threads: int = 2
    plots: bool = True

    def methods(self) -> list[Method]:
        methods = default_methods(self.k_max, self.fixed_ks, self.policies, self.hf_assisted if self.include_hf else [])
        return [m for m in methods if self.include_hf or m.kind == "ours"]


def machine() -> dict:
    """The machine a benchmark ran on (loadtest.environment's record) and the torch it ran with (eesd.hardware's:
    threads, CPU kernels, CUDA device, what dtype auto chooses)."""
    return {**environment.machine(), **hardware.hardware_record(), "transformers": transformers.__version__}


def _pool(runs: list[Run]) -> dict:
    """Speculation statistics over many generations of one method."""
    stats = [r.stats for r in runs if r.stats]
    if not stats:
        return {}
    rounds = sum(s["rounds"] for s in stats)
    drafted_rounds = sum(sum(v for k, v in s["k_histogram"].items() if k != "0") for s in stats)
    k_hist: Counter = Counter()
    drafted_at: Counter = Counter()
    accepted_at: Counter = Counter()
    for s in stats:
        k_hist.update({int(k): v for k, v in s["k_histogram"].items()})
        for r in s["per_round"]:
            for position in range(r["drafted"]):
                drafted_at[position] += 1
                accepted_at[position] += position < r["accepted"]
    drafted_hist = Counter(r["drafted"] for s in stats for r in s["per_round"])
    return {
        "rounds": rounds,
        "mean_accepted_tokens": sum(s["generated"] for s in stats) / rounds,
        "mean_drafted": sum(s["drafted"] for s in stats) / rounds,
        "acceptance_rate": sum(s["accepted"] for s in stats) / max(1, sum(s["drafted"] for s in stats)),
        "acceptance_by_position": [accepted_at[i] / drafted_at[i] for i in sorted(drafted_at)],
        "k_histogram": {str(k): v for k, v in sorted(k_hist.items())},  # the bound begin_round chose
        "drafted_histogram": {str(k): v for k, v in sorted(drafted_hist.items())},  # drafts actually made
        "draft_ms_per_round": 1e3 * sum(s["draft_s"] for s in stats) / rounds,
        "verify_ms_per_round": 1e3 * sum(s["verify_s"] for s in stats) / rounds,
        "draft_ms_per_token": 1e3 * sum(s["draft_s"] for s in stats) / max(1, sum(s["drafted"] for s in stats)),
        "speculative_rounds": drafted_rounds,
    }


def _summary(method: Method, per_rep: list[list[Run]], baselines: dict[str, list[list[Run]]], reference) -> dict:
    """per_rep[r]: the method's runs over the prompts in repetition r."""
    tps = [sum(len(x.tokens) for x in runs) / sum(x.seconds for x in runs) for runs in per_rep]
    out = {
        "label": method.label or method.name,
        "kind": method.kind,
        "policy": method.policy,
        "options": method.options,
        "tokens_per_second": statistics.median(tps),
        "tokens_per_second_per_repetition": tps,
    }
    for base_name, base_runs in baselines.items():
        base_tps = [sum(len(x.tokens) for x in runs) / sum(x.seconds for x in runs) for runs in base_runs]
        out[f"speedup_vs_{base_name}"] = statistics.median(a / b for a, b in zip(tps, base_tps, strict=True))
    if reference is not None:  # same tokens as our autoregressive path, prompt by prompt
        pairs = zip((x for runs in per_rep for x in runs), (r for refs in reference for r in refs), strict=True)
        same = [x.tokens == ref.tokens for x, ref in pairs]
        out["same_tokens_as_ours_ar"] = sum(same) / len(same)
    out.update(_pool([x for runs in per_rep for x in runs]))
    return out


def run_suite(cfg: BenchConfig, progress: bool = True) -> dict:
    """Runs every method at every temperature; writes <out_dir>/<name>.json (and PNGs); returns the result."""
    torch.set_num_threads(cfg.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    methods = cfg.methods()
    need_hf = any(m.kind != "ours" for m in methods)
    runners = Runners(cfg.model_dir, cfg.exit_layer, cfg.exit_head, cfg.dtype, cfg.k_max, need_hf)
    started = time.time()
    results = {}
    for temperature in cfg.temperatures:
        for method in methods:  # warm-up: allocations, lazy imports, first-call paths
            runners.run(method, cfg.prompts[0], min(8, cfg.max_new_tokens), temperature, cfg.seed)
        runs: dict[str, list[list[Run]]] = {m.name: [] for m in methods}
        for rep in range(cfg.repetitions):
            for m in methods:
                runs[m.name].append([])
            for p, prompt in enumerate(cfg.prompts):
                shift = (rep * len(cfg.prompts) + p) % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    # Same seed for every method on a prompt: HF and ours draw differently, but each is exact.
                    run = runners.run(method, prompt, cfg.max_new_tokens, temperature, cfg.seed + p)
                    runs[method.name][rep].append(run)
            log(f"bench: temperature {temperature}: repetition {rep + 1}/{cfg.repetitions} done")
        baselines = {"ours_ar": runs["ours-ar"]}
        if "hf-generate" in runs:
            baselines = {"hf_generate": runs["hf-generate"], **baselines}
        reference = runs["ours-ar"] if temperature == 0 else None
        results[str(temperature)] = {m.name: _summary(m, runs[m.name], baselines, reference) for m in methods}
    result = {
        "name": cfg.name,
        "machine": machine(),
        "dtype": hardware.dtype_name(cfg.dtype),  # config.dtype as requested, this as resolved
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"}
        | {"num_prompts": len(cfg.prompts), "prompt_lengths": [len(p) for p in cfg.prompts]},
        "wall_s": time.time() - started,
        "results": results,
    }
    result["headline"] = headline(result)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if cfg.plots:
        from bench.plots import plot_all

        result["plots"] = [str(p) for p in plot_all(result, out)]
        (out / f"{cfg.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def headline(result: dict) -> dict:
    """The targets of the benchmark issue, evaluated on the greedy results."""
    greedy = result["results"].get("0.0")
    if not greedy:
        return {}
    spec = {n: r for n, r in greedy.items() if r["kind"] == "ours" and r["policy"] != "off"}
    fixed = {n: r for n, r in spec.items() if r["policy"] == "fixed"}
    best = max(spec, key=lambda n: spec[n]["speedup_vs_ours_ar"])
    out = {"best_method": best, "best_speedup_vs_ours_ar": spec[best]["speedup_vs_ours_ar"]}
    if "hf-generate" in greedy:
        out["best_speedup_vs_hf_generate"] = spec[best]["speedup_vs_hf_generate"]
        assisted = [n for n in greedy if greedy[n]["kind"] == "hf-assisted-ee"]
        if assisted:
            best_hf = max(assisted, key=lambda n: greedy[n]["tokens_per_second"])
            ratio = [
                a / b
                for a, b in zip(
                    spec[best]["tokens_per_second_per_repetition"],
                    greedy[best_hf]["tokens_per_second_per_repetition"],
                    strict=True,
                )
            ]
            out["best_hf_assisted"] = best_hf
            out["best_speedup_vs_best_hf_assisted"] = statistics.median(ratio)
    if fixed:
        best_fixed = max(fixed, key=lambda n: fixed[n]["speedup_vs_ours_ar"])
        out["best_fixed"] = best_fixed
        for ts in [n for n in spec if spec[n]["policy"] in ("beta-ts", "calibration-ts")]:
            if ts in spec:
                out[f"{ts}_vs_best_fixed"] = spec[ts]["speedup_vs_ours_ar"] / fixed[best_fixed]["speedup_vs_ours_ar"]
                if "ours-heuristic" in spec:
                    out[f"{ts}_vs_heuristic"] = (
                        spec[ts]["speedup_vs_ours_ar"] / spec["ours-heuristic"]["speedup_vs_ours_ar"]
                    )
    return out
