"""`eesd sweep`: which exit layer N to serve a model with.

For each candidate N the sweep gets an exit layer (a quick distillation, cached per model build, N and
settings, or an untrained copy of the last layer with `untrained`), then measures every drafter against
plain decoding (ours, no speculation) with the benchmark's measuring code (bench.suite.measure: the same
prompts, interleaved, medians over repetitions) on held-out prompts, never the distillation prompts.

Recommended: the N with the highest median speedup over plain decoding. A deeper exit drafts better
tokens (higher acceptance, longer accepted blocks) but each draft step costs more (N of the model's L
layers plus the exit layer), so the speedup peaks somewhere in between; only a measurement says where.
"""

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.methods import Method, Runners, parse_policy_spec
from bench.prompts import PromptSet
from bench.suite import BenchConfig, machine, measure
from eesd.checkpoint import load_config
from eesd.distill import REPORT_FILE, DistillConfig, distill, load_prompts, up_to_date
from eesd.errors import InvalidArgument
from eesd.hardware import dtype_name
from eesd.presets import QUICK_DISTILL_PROMPTS, QUICK_DISTILL_STEPS, quick_distill_fields, reference_distill_config
from loadtest import environment

# Candidate exit layers, kept while N <= MAX_DRAFT_SHARE of the model's layers: beyond that a draft step
# costs too large a share of a verify pass for speculation to pay.
CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_DRAFT_SHARE = 0.4
RULE = "the N with the highest median speedup over plain decoding (ours, no speculation) on the held-out prompts"


def default_exit_layers(num_layers: int) -> list[int]:
    """A handful of N spread over the model's depth, denser where drafters are cheap: 1, 2, 3, 4, 6 for 16
    layers, 1..12 in 7 steps for 32; always N=1."""
    top = max(1, int(MAX_DRAFT_SHARE * num_layers))
    return [n for n in CANDIDATES if n <= min(top, num_layers - 1)] or [1]


def recommend(rows: dict[int, dict]) -> int:
    """The exit layer of the highest median speedup over plain decoding (RULE)."""
    return max(rows, key=lambda n: rows[n]["speedup_vs_ours_ar"])


@dataclass(frozen=True)
class SweepConfig:
    model_dir: str
    exit_layers: list[int]
    prompts: PromptSet  # held-out: never the distillation prompts
    distill_prompts: str | None = None  # the distillation corpus (None: random ids, as eesd distill)
    untrained: bool = False  # untrained exit layers instead of distilled ones
    policy: str = "beta-ts"  # a policy spec, as eesd bench --policies takes them
    temperature: float = 0.0
    max_new_tokens: int = 96
    repetitions: int = 3
    dtype: str = "auto"
    k_max: int = 8
    threads: int = 2
    seed: int = 0
    distill_steps: int = QUICK_DISTILL_STEPS
    distill_num_prompts: int = QUICK_DISTILL_PROMPTS
    cache_dir: str = ".cache/sweep"
    out_dir: str = "bench/results"
    name: str = "sweep"
    plots: bool = True
    command: str = ""


def model_stamp(model_dir: str) -> str:
    """The model build a cached head belongs to: a reference model's build stamp, else a hash of the config
    and the weight files' names, sizes and modification times (a rewritten checkpoint changes it)."""
    root = Path(model_dir)
    report = root / "build_report.json"
    if report.is_file() and "stamp" in (build := json.loads(report.read_text())):
        return build["stamp"]
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for weights in sorted(root.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def distill_config(cfg: SweepConfig, exit_layer: int, stamp: str) -> DistillConfig:
    """The reference recipe (`make model`'s) at the sweep's quick settings, in a cache directory of its own
    per model build, N and settings."""
    quick = replace(
        reference_distill_config(cfg.model_dir, "", exit_layer, cfg.distill_prompts),
        **quick_distill_fields(cfg.distill_steps, cfg.distill_num_prompts),
    )
    key = hashlib.sha256(json.dumps([stamp, asdict(quick)], sort_keys=True).encode()).hexdigest()[:12]
    return replace(quick, out_dir=str(Path(cfg.cache_dir) / f"{Path(cfg.model_dir).name}-n{exit_layer}-{key}"))


def check_held_out(prompts: PromptSet, distill_cfg: DistillConfig, vocab_size: int) -> None:
    """Refuses evaluation prompts that are distillation prompts or come from a distillation source file."""
    distilled = {tuple(p) for p in load_prompts(distill_cfg, vocab_size)}
    same = [
        i for i, p in zip(prompts.indices, prompts.ids, strict=True) if tuple(p[-distill_cfg.prompt_len :]) in distilled
    ]
    paths: set[str] = set()
    source = Path(distill_cfg.prompts or "")
    if source.suffix == ".jsonl" and source.is_file():
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        paths = {r["path"] for r in rows if "path" in r} & set(prompts.paths)
    if same or paths:
        raise InvalidArgument(
            "prompts",
            f"the sweep measures on held-out prompts: rows {same} and source files {sorted(paths)} of "
            f"{prompts.source} are distillation prompts ({distill_cfg.prompts})",
        )


def exit_heads(cfg: SweepConfig, stamp: str, progress: bool) -> dict[int, dict]:
    """Per N: the exit head (a directory, None when untrained) and its distillation report's numbers."""
    heads: dict[int, dict] = {}
    corpus: Path | None = None
    vocab_size = load_config(cfg.model_dir).vocab_size
    for n in cfg.exit_layers:
        if cfg.untrained:
            heads[n] = {"exit_head": None}
            continue
        dcfg = distill_config(cfg, n, stamp)
        check_held_out(cfg.prompts, dcfg, vocab_size)
        cached = up_to_date(dcfg, stamp)
        if not cached:
            # The target's continuations do not depend on N: the first N's corpus serves every N (distill
            # reuses a checkpoints/corpus.json whose settings match and regenerates one that does not).
            own = Path(dcfg.out_dir) / "checkpoints" / "corpus.json"
            if corpus is not None and not own.is_file():
                own.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(corpus, own)
            distill(dcfg, progress=progress, model_stamp=stamp)
        corpus = Path(dcfg.out_dir) / "checkpoints" / "corpus.json"
        report = json.loads((Path(dcfg.out_dir) / REPORT_FILE).read_text())
        heads[n] = {
            "exit_head": dcfg.out_dir,
            "cached": cached,
            "distill": {key: report[key] for key in ("before", "after", "generation_s", "training_s", "train_tokens")},
        }
    return heads


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Exit heads, then the measurement; writes <out_dir>/<name>.json (and .png); returns the result."""
    torch.set_num_threads(cfg.threads)
    num_layers = load_config(cfg.model_dir).num_hidden_layers
    stamp = model_stamp(cfg.model_dir)
    started, machine_record = time.time(), machine()
    heads = exit_heads(cfg, stamp, progress)
    distill_s = time.time() - started

    name, options = parse_policy_spec(cfg.policy)
    drafters = [(n, heads[n]["exit_head"]) for n in cfg.exit_layers]
    methods = [Method("ours-ar", "ours", "off", label="ours, no speculation")] + [
        Method(f"n{n}", "ours", name, options, label=f"N={n}", drafter=(n, head)) for n, head in drafters
    ]
    bench_cfg = BenchConfig(
        model_dir=cfg.model_dir,
        exit_layer=drafters[0][0],
        exit_head=drafters[0][1],
        prompts=cfg.prompts.ids,
        max_new_tokens=cfg.max_new_tokens,
        repetitions=cfg.repetitions,
        temperatures=[cfg.temperature],
        dtype=cfg.dtype,
        k_max=cfg.k_max,
        include_hf=False,
        seed=cfg.seed,
        threads=cfg.threads,
    )
    measured_at = time.time()
    runners = Runners(cfg.model_dir, *drafters[0], cfg.dtype, cfg.k_max, need_hf=False)
    rows = measure(runners, methods, cfg.prompts.ids, cfg.temperature, bench_cfg, "sweep: measuring", progress)
    baseline = rows["ours-ar"]["tokens_per_second_per_repetition"]
    by_n = {}
    for n in cfg.exit_layers:
        row = rows[f"n{n}"]
        ratios = [a / b for a, b in zip(row["tokens_per_second_per_repetition"], baseline, strict=True)]
        by_n[n] = {"exit_layer": n, **heads[n], **row, "speedup_vs_ours_ar_per_repetition": ratios}
    best = recommend(by_n)
    result = {
        "name": cfg.name,
        "command": cfg.command,
        "source_tree": environment.source_tree(cfg.out_dir),
        "machine": machine_record,
        "load_average": {"start": machine_record["load_average"], "end": environment.load_average()},
        "model": {"model_dir": cfg.model_dir, "layers": num_layers, "stamp": stamp, "dtype": dtype_name(cfg.dtype)},
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"} | {"prompts": cfg.prompts.record()},
        "distill_s": distill_s,
        "measure_s": time.time() - measured_at,
        "wall_s": time.time() - started,
        "baseline": rows["ours-ar"],
        "exit_layers": {str(n): row for n, row in by_n.items()},
        "recommended": {
            "exit_layer": best,
            "rule": RULE,
            "speedup_vs_ours_ar": by_n[best]["speedup_vs_ours_ar"],
            # Below 1 no drafter pays on this model and machine: serve it without speculation.
            "speculation_pays": by_n[best]["speedup_vs_ours_ar"] > 1.0,
        },
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.plots:
        from bench.plots import plot_sweep

        result["plots"] = [str(plot_sweep(result, out / f"{cfg.name}.png"))]
    (out / f"{cfg.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
