"""PNG plots of a benchmark result: speedup per method, tau and speedup vs k, the k chosen by each policy."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POLICY_MARKERS = {"heuristic": "s", "threshold": "^", "beta-ts": "o", "calibration-ts": "D"}


def _title(result: dict, what: str, temperature: str) -> str:
    mode = "greedy" if float(temperature) == 0 else f"T={temperature}"
    return f"{result['name']}: {what} ({mode}, median of {result['config']['repetitions']})"


def plot_speedup(result: dict, temperature: str, path: Path) -> Path:
    rows = result["results"][temperature]
    names = list(rows)
    base = "speedup_vs_hf_generate" if "hf-generate" in rows else "speedup_vs_ours_ar"
    values = [rows[n][base] for n in names]
    colors = [
        "#999999" if rows[n]["kind"] != "ours" else "#4c72b0" if rows[n]["policy"] in ("off", "fixed") else "#dd8452"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(names)), values, color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [rows[n]["label"] for n in names], rotation=45, ha="right")
    ax.set_ylabel("speedup vs " + ("HF generate" if base.endswith("hf_generate") else "ours, no speculation"))
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(_title(result, "tokens/s ratio", temperature))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_k_sweep(result: dict, temperature: str, path: Path) -> Path:
    rows = result["results"][temperature]
    fixed = sorted((r["options"]["k"], r) for r in rows.values() if r["policy"] == "fixed")
    policies = [r for r in rows.values() if r["kind"] == "ours" and r["policy"] not in ("off", "fixed")]
    fig, (ax_tau, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = [k for k, _ in fixed]
    ax_tau.plot(ks, [r["mean_accepted_tokens"] for _, r in fixed], "o-", color="#4c72b0", label="fixed k")
    ax_speed.plot(ks, [r["speedup_vs_ours_ar"] for _, r in fixed], "o-", color="#4c72b0", label="fixed k")
    for r in policies:  # a policy sits at its mean number of drafts per round
        marker = POLICY_MARKERS.get(r["policy"], "x")
        ax_tau.plot(r["mean_drafted"], r["mean_accepted_tokens"], marker, ms=9, label=r["label"])
        ax_speed.plot(r["mean_drafted"], r["speedup_vs_ours_ar"], marker, ms=9, label=r["label"])
    ax_tau.set_xlabel("k (policies: mean drafts per round)")
    ax_tau.set_ylabel("tau: tokens committed per round")
    ax_speed.set_xlabel("k (policies: mean drafts per round)")
    ax_speed.set_ylabel("speedup vs ours, no speculation")
    ax_speed.axhline(1.0, color="black", lw=0.8)
    ax_tau.legend(fontsize=8)
    ax_tau.set_title(_title(result, "tau vs k", temperature), fontsize=9)
    ax_speed.set_title(_title(result, "speedup vs k", temperature), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_k_histogram(result: dict, temperature: str, path: Path) -> Path:
    rows = result["results"][temperature]
    policies = [r for r in rows.values() if r["kind"] == "ours" and r["policy"] not in ("off", "fixed")]
    fig, axes = plt.subplots(1, max(1, len(policies)), figsize=(3.2 * max(1, len(policies)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], policies, strict=False):
        hist = {int(k): v for k, v in r["drafted_histogram"].items()}
        total = sum(hist.values())
        ks = range(0, max(hist) + 1)
        ax.bar(ks, [hist.get(k, 0) / total for k in ks], color="#dd8452")
        ax.set_title(f"{r['label']} (mean {r['mean_drafted']:.2f})", fontsize=9)
        ax.set_xlabel("drafts in a round")
    axes[0][0].set_ylabel("share of rounds")
    fig.suptitle(_title(result, "k chosen per round", temperature), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result: dict, out_dir: Path) -> list[Path]:
    paths = []
    for temperature, rows in result["results"].items():
        tag = "greedy" if float(temperature) == 0 else f"t{temperature}"
        stem = out_dir / f"{result['name']}-{tag}"
        paths.append(plot_speedup(result, temperature, Path(f"{stem}-speedup.png")))
        if any(r["policy"] == "fixed" for r in rows.values()):
            paths.append(plot_k_sweep(result, temperature, Path(f"{stem}-k-sweep.png")))
        if any(r["kind"] == "ours" and r["policy"] not in ("off", "fixed") for r in rows.values()):
            paths.append(plot_k_histogram(result, temperature, Path(f"{stem}-k-histogram.png")))
    return paths


def plot_sweep(result: dict, path: Path) -> Path:
    """eesd sweep: speedup over plain decoding (median, bars: the repetitions' range) and tau and per-token
    acceptance against the exit layer N; the recommended N marked."""
    rows = sorted(result["exit_layers"].values(), key=lambda r: r["exit_layer"])
    ns = [r["exit_layer"] for r in rows]
    speedups = [r["speedup_vs_ours_ar"] for r in rows]
    low = [s - min(r["speedup_vs_ours_ar_per_repetition"]) for s, r in zip(speedups, rows, strict=True)]
    high = [max(r["speedup_vs_ours_ar_per_repetition"]) - s for s, r in zip(speedups, rows, strict=True)]
    best = result["recommended"]["exit_layer"]
    fig, (ax_speed, ax_tau) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_speed.errorbar(ns, speedups, yerr=[low, high], fmt="o-", color="#4c72b0", capsize=3)
    ax_speed.plot([best], [result["recommended"]["speedup_vs_ours_ar"]], "*", ms=16, color="#dd8452", label=f"N={best}")
    ax_speed.axhline(1.0, color="black", lw=0.8)
    ax_speed.set_xlabel("exit layer N")
    ax_speed.set_ylabel("speedup vs ours, no speculation")
    ax_speed.legend(fontsize=8)
    ax_tau.plot(ns, [r["mean_accepted_tokens"] for r in rows], "o-", color="#4c72b0", label="tau (tokens per round)")
    ax_acc = ax_tau.twinx()
    ax_acc.plot(ns, [r["acceptance_rate"] for r in rows], "s--", color="#55a868", label="per-token acceptance")
    ax_acc.set_ylim(0, 1)
    ax_tau.set_xlabel("exit layer N")
    ax_tau.set_ylabel("tau: tokens committed per round")
    ax_acc.set_ylabel("per-token acceptance")
    ax_tau.legend(loc="upper left", fontsize=8)
    ax_acc.legend(loc="lower right", fontsize=8)
    for ax in (ax_speed, ax_tau):
        ax.set_xticks(ns)
    config, model = result["config"], result["model"]
    mode = "greedy" if config["temperature"] == 0 else f"T={config['temperature']}"
    heads = "untrained exit layers" if config["untrained"] else f"exit layers distilled {config['distill_steps']} steps"
    fig.suptitle(
        f"{result['name']}: {Path(model['model_dir']).name} ({model['layers']} layers, {model['dtype']}), {heads}, "
        f"{config['policy']}, {mode}, median of {config['repetitions']}; load {result['load_average']['start']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
