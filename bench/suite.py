"""The benchmark suite: every method on the same model and prompts, interleaved, medians over repetitions.

Within a repetition the methods run prompt by prompt in a rotating order, so slow drift of a shared
machine hits every method alike; each repetition yields one tokens/s per method (tokens over seconds
summed across the prompts) and one speedup per method against each baseline of the same repetition.
Reported: medians over repetitions of both, and the speculation statistics pooled over all runs.

Policy options are tuned on other prompts than those the result is measured on: with `tune_policies`,
the candidates run first on `tune_prompts` (disjoint from `prompts`), the best option set of each policy
there joins the evaluation as a row labelled tuned, and the headline is a policy with its default options,
chosen on the tuning prompts too.
"""

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from bench.methods import Method, Run, Runners, default_methods, parse_policy_spec
from eesd import hardware
from eesd.errors import InvalidArgument
from eesd.progress import Progress
from loadtest import environment

POLICIES = ["heuristic", "threshold", "beta-ts", "calibration-ts"]
# The headline is one of these with its default options (the paper's rules and our +2/-1 baseline): no
# option of it was chosen on any prompt.
DEFAULT_POLICIES = ("heuristic", "beta-ts", "calibration-ts")
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
    command: str = ""  # how it was run, for the record
    # Where each prompt set came from (bench.prompts.PromptSet.record()): "evaluation", "tuning".
    prompt_sources: dict = field(default_factory=dict)
    tune_prompts: list[list[int]] = field(default_factory=list)  # disjoint from `prompts`
    tune_policies: list[str] = field(default_factory=list)  # candidate option sets: "beta-ts[discount=0.8]", ...
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


def ratio_of_pairs(numerators: list[float], denominators: list[float]) -> float:
    """Median over repetitions of the ratio within each one: robust to a machine that drifts between them."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` by rank (0.0 when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


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
        "tuned": method.tuned,
        "tokens_per_second": statistics.median(tps),
        "tokens_per_second_per_repetition": tps,
    }
    for base_name, base_runs in baselines.items():
        base_tps = [sum(len(x.tokens) for x in runs) / sum(x.seconds for x in runs) for runs in base_runs]
        out[f"speedup_vs_{base_name}"] = ratio_of_pairs(tps, base_tps)
    if reference is not None:  # same tokens as our autoregressive path, prompt by prompt
        pairs = zip((x for runs in per_rep for x in runs), (r for refs in reference for r in refs), strict=True)
        same = [x.tokens == ref.tokens for x, ref in pairs]
        out["same_tokens_as_ours_ar"] = sum(same) / len(same)
    out.update(_pool([x for runs in per_rep for x in runs]))
    return out


def measure(
    runners: Runners,
    methods: list[Method],
    prompts: list[list[int]],
    temperature: float,
    cfg: BenchConfig,
    desc: str,
    progress: bool = True,
) -> dict[str, dict]:
    """Every method on every prompt at one temperature, interleaved, `cfg.repetitions` times: a summary per
    method name (tokens/s, speedups over the baselines of the same repetition, speculation statistics)."""
    for method in methods:  # warm-up: allocations, lazy imports, first-call paths
        runners.run(method, prompts[0], min(8, cfg.max_new_tokens), temperature, cfg.seed)
    runs: dict[str, list[list[Run]]] = {m.name: [] for m in methods}
    total = cfg.repetitions * len(prompts) * len(methods)
    with Progress(total, desc, unit="run", enabled=progress) as bar:
        for rep in range(cfg.repetitions):
            for m in methods:
                runs[m.name].append([])
            for p, prompt in enumerate(prompts):
                shift = (rep * len(prompts) + p) % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    # Same seed for every method on a prompt: HF and ours draw differently, but each is exact.
                    run = runners.run(method, prompt, cfg.max_new_tokens, temperature, cfg.seed + p)
                    runs[method.name][rep].append(run)
                    bar.update(repetition=f"{rep + 1}/{cfg.repetitions}")
    baselines = {"ours_ar": runs["ours-ar"]}
    if "hf-generate" in runs:
        baselines = {"hf_generate": runs["hf-generate"], **baselines}
    reference = runs["ours-ar"] if temperature == 0 else None
    return {m.name: _summary(m, runs[m.name], baselines, reference) for m in methods}


def choose_tuned(rows: dict[str, dict], methods: list[Method]) -> dict[str, str]:
    """Per policy, the method name (its defaults or a candidate option set) with the highest median speedup
    over our autoregressive path in a tuning run's `rows`."""
    best: dict[str, str] = {}
    for m in methods:
        if m.kind == "ours" and m.policy not in ("off", "fixed"):
            current = best.get(m.policy)
            if current is None or rows[m.name]["speedup_vs_ours_ar"] > rows[current]["speedup_vs_ours_ar"]:
                best[m.policy] = m.name
    return best


def tuning_methods(cfg: BenchConfig) -> list[Method]:
    """Our autoregressive path, each policy of the candidates and of the headline with its defaults, and the
    candidate option sets."""
    candidates = [parse_policy_spec(spec) for spec in cfg.tune_policies]
    names = list(dict.fromkeys([*DEFAULT_POLICIES, *(name for name, _ in candidates)]))
    methods = [m for m in default_methods(cfg.k_max, [], names, []) if m.kind == "ours"]
    return methods + [
        Method(f"ours-{spec}", "ours", *parse_policy_spec(spec), label=spec) for spec in cfg.tune_policies
    ]


def tune(runners: Runners, cfg: BenchConfig, temperature: float, progress: bool = True) -> dict:
    """Runs the candidates on the tuning prompts; -> {"chosen": {policy: spec}, "results": rows}."""
    methods = tuning_methods(cfg)
    rows = measure(runners, methods, cfg.tune_prompts, temperature, cfg, f"bench: tuning at T={temperature}", progress)
    tuned = {parse_policy_spec(spec)[0] for spec in cfg.tune_policies}
    chosen = {policy: rows[name]["label"] for policy, name in choose_tuned(rows, methods).items() if policy in tuned}
    return {"chosen": chosen, "results": rows}


def tuned_methods(chosen: dict[str, str]) -> list[Method]:
    """Evaluation rows for the option sets a tuning run chose (a policy whose defaults won has none)."""
    methods = []
    for spec in chosen.values():
        name, options = parse_policy_spec(spec)
        if options:
            methods.append(Method(f"ours-tuned-{spec}", "ours", name, options, label=f"{spec} (tuned)", tuned=True))
    return methods


def check_disjoint(evaluation: list[list[int]], tuning: list[list[int]]) -> None:
    if shared := {tuple(p) for p in evaluation} & {tuple(p) for p in tuning}:
        raise InvalidArgument("tune_prompts", f"{len(shared)} tuning prompts are also evaluation prompts")


def run_suite(cfg: BenchConfig, progress: bool = True) -> dict:
    """Runs every method at every temperature (after the tuning run, when there are candidates); writes
    <out_dir>/<name>.json (and PNGs); returns the result."""
    torch.set_num_threads(cfg.threads)
    if cfg.tune_policies:
        if not cfg.tune_prompts:
            raise InvalidArgument("tune_prompts", "tuning candidates need tuning prompts")
        check_disjoint(cfg.prompts, cfg.tune_prompts)
    methods = cfg.methods()
    need_hf = any(m.kind != "ours" for m in methods)
    runners = Runners(cfg.model_dir, cfg.exit_layer, cfg.exit_head, cfg.dtype, cfg.k_max, need_hf)
    started, machine_record = time.time(), machine()
    results, tuning = {}, {}
    for temperature in cfg.temperatures:
        extra = []
        if cfg.tune_policies:
            tuning[str(temperature)] = tune(runners, cfg, temperature, progress)
            extra = tuned_methods(tuning[str(temperature)]["chosen"])
        desc = f"bench: T={temperature}"
        results[str(temperature)] = measure(runners, methods + extra, cfg.prompts, temperature, cfg, desc, progress)
    result = {
        "name": cfg.name,
        "command": cfg.command,
        "source_tree": environment.source_tree(cfg.out_dir),
        "machine": machine_record,
        "dtype": hardware.dtype_name(cfg.dtype),  # config.dtype as requested, this as resolved
        "load_average": {"start": machine_record["load_average"], "end": environment.load_average()},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "tune_prompts", "command")}
        | {"num_prompts": len(cfg.prompts), "prompt_lengths": [len(p) for p in cfg.prompts]},
        "wall_s": time.time() - started,
        "tuning": tuning,
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
    """The greedy headline: the policy of DEFAULT_POLICIES, default options, that was fastest on the tuning
    prompts (on the evaluation prompts when no tuning ran: then the choice of one of three is made on them),
    its speedups on the evaluation prompts, and the benchmark issue's comparisons."""
    greedy = result["results"].get("0.0")
    if not greedy:
        return {}
    defaults = [
        n for n, r in greedy.items() if r["kind"] == "ours" and r["policy"] in DEFAULT_POLICIES and not r["options"]
    ]
    if not defaults:
        return {}
    tuning = result.get("tuning", {}).get("0.0")
    ranking = tuning["results"] if tuning else greedy
    method = max(defaults, key=lambda n: ranking[n]["speedup_vs_ours_ar"])
    speedups = lambda row: {k: v for k, v in row.items() if k.startswith("speedup_vs_")}  # noqa: E731
    out = {
        "method": method,
        "chosen_on": "tuning prompts" if tuning else "evaluation prompts",
        **speedups(greedy[method]),
        "default_policies": {n: speedups(greedy[n]) for n in defaults},
        "tuned": {n: speedups(r) for n, r in greedy.items() if r.get("tuned")},
    }
    assisted = [n for n in greedy if greedy[n]["kind"] == "hf-assisted-ee"]
    if assisted:
        best_hf = max(assisted, key=lambda n: greedy[n]["tokens_per_second"])
        out["best_hf_assisted"] = best_hf
        out["speedup_vs_best_hf_assisted"] = ratio_of_pairs(
            greedy[method]["tokens_per_second_per_repetition"], greedy[best_hf]["tokens_per_second_per_repetition"]
        )
    spec = {n: r for n, r in greedy.items() if r["kind"] == "ours" and r["policy"] != "off"}
    fixed = {n: r for n, r in spec.items() if r["policy"] == "fixed"}
    if fixed:  # an oracle: the best k is chosen on the evaluation prompts
        best_fixed = max(fixed, key=lambda n: fixed[n]["speedup_vs_ours_ar"])
        out["best_fixed_k_oracle"] = best_fixed
        for ts in (n for n in spec if spec[n]["policy"] in ("beta-ts", "calibration-ts")):
            out[f"{ts}_vs_best_fixed"] = spec[ts]["speedup_vs_ours_ar"] / fixed[best_fixed]["speedup_vs_ours_ar"]
            if "ours-heuristic" in spec:
                out[f"{ts}_vs_heuristic"] = (
                    spec[ts]["speedup_vs_ours_ar"] / spec["ours-heuristic"]["speedup_vs_ours_ar"]
                )
    return out
