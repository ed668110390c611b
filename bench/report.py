"""A benchmark result as a Markdown table (docs/benchmarks.md quotes these)."""

import json
import sys
from pathlib import Path


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def machine_line(result: dict) -> str:
    """The machine, the code and the load a result ran on, in one line."""
    m = result["machine"]
    flags = [flag for flag, present in m.get("cpu_flags", {}).items() if present]
    load = result.get("load_average", {})
    tree = result.get("source_tree", {})
    return (
        f"Machine: {m['cpu']} (CPU flags: {', '.join(flags) or 'none of ' + ', '.join(m.get('cpu_flags', {}))}), "
        f"{m['cores_available']} cores available, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}; commit {tree.get('commit', '?')}; "
        f"load average (1/5/15 min) {load.get('start')} at the start, {load.get('end')} at the end."
    )


def _prompts_line(record: dict) -> str:
    files = sorted({p for p in record["paths"] if p})
    return f"{record['source']} rows {record['indices']}" + (f" (from {', '.join(files)})" if files else "")


def _speedups(row: dict) -> str:
    hf = f"{row['speedup_vs_hf_generate']:.2f}x HF generate, " if "speedup_vs_hf_generate" in row else ""
    return hf + f"{row['speedup_vs_ours_ar']:.2f}x ours AR"


def _headline(result: dict) -> list[str]:
    h = result.get("headline")
    if not h:
        return []
    greedy = result["results"]["0.0"]
    line = (
        f"Headline (greedy): **{greedy[h['method']]['label']}** with its default options (the fastest of "
        f"{', '.join(greedy[n]['label'] for n in h['default_policies'])} on the {h['chosen_on']}): "
        f"{_speedups(h)}"
    )
    if "speedup_vs_best_hf_assisted" in h:
        line += f", {h['speedup_vs_best_hf_assisted']:.2f}x {greedy[h['best_hf_assisted']]['label']}"
    lines = [line + ".", ""]
    if h["tuned"]:
        tuned = "; ".join(f"{greedy[n]['label']}: {_speedups(v)}" for n, v in h["tuned"].items())
        lines += [f"Tuned on the tuning prompts (not the headline): {tuned}.", ""]
    rest = {k: v for k, v in h.items() if k.endswith(("_vs_best_fixed", "_vs_heuristic")) or k.endswith("oracle")}
    if rest:
        lines += [
            "Comparisons (greedy; the best fixed k is an oracle chosen on the evaluation prompts): "
            + ", ".join(f"{k} = {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in rest.items()),
            "",
        ]
    return lines


def _tuning(result: dict) -> list[str]:
    lines = []
    for temperature, run in result.get("tuning", {}).items():
        mode = "greedy" if float(temperature) == 0 else f"temperature {temperature}"
        rows = run["results"]
        chosen = ", ".join(f"{policy}: {spec}" for policy, spec in run["chosen"].items())
        lines += [
            f"**Tuning, {mode}** (tuning prompts; chosen per policy, highest median speedup over ours AR: {chosen})",
            "",
            "| candidate | tok/s | vs ours AR | tau | mean k |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in rows.values():
            lines.append(
                f"| {row['label']} | {row['tokens_per_second']:.1f} | {_fmt(row.get('speedup_vs_ours_ar'))} "
                f"| {_fmt(row.get('mean_accepted_tokens'))} | {_fmt(row.get('mean_drafted'))} |"
            )
        lines.append("")
    return lines


def markdown(result: dict) -> str:
    config = result["config"]
    lines = [
        f"### {result['name']}",
        "",
        machine_line(result),
        "",
        f"dtype {result.get('dtype', config['dtype'])} ({config['dtype']} requested), "
        f"{config['num_prompts']} prompts x {config['max_new_tokens']} new tokens, "
        f"median of {config['repetitions']} interleaved repetitions."
        + (f" Command: `{result['command']}`" if result.get("command") else ""),
        "",
    ]
    sources = config.get("prompt_sources", {})
    if sources:
        lines += [f"- {kind} prompts: {_prompts_line(record)}" for kind, record in sources.items()] + [""]
    lines += _tuning(result)
    for temperature, rows in result["results"].items():
        mode = "greedy" if float(temperature) == 0 else f"temperature {temperature}"
        lines += [
            f"**{mode}**",
            "",
            "| method | tok/s | vs HF generate | vs ours AR | tau | accept rate | mean k | draft ms/round "
            "| verify ms/round | same tokens as ours AR |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows.values():
            lines.append(
                f"| {row['label']} | {row['tokens_per_second']:.1f} | {_fmt(row.get('speedup_vs_hf_generate'))} "
                f"| {_fmt(row.get('speedup_vs_ours_ar'))} | {_fmt(row.get('mean_accepted_tokens'))} "
                f"| {_fmt(row.get('acceptance_rate'))} | {_fmt(row.get('mean_drafted'))} "
                f"| {_fmt(row.get('draft_ms_per_round'), 1)} | {_fmt(row.get('verify_ms_per_round'), 1)} "
                f"| {_fmt(row.get('same_tokens_as_ours_ar'))} |"
            )
        lines.append("")
    return "\n".join(lines + _headline(result))


def sweep_markdown(result: dict) -> str:
    """eesd sweep's table: one row per exit layer N, and the recommendation with its rule."""
    config, model, best = result["config"], result["model"], result["recommended"]
    heads = (
        "untrained exit layers (copies of the last layer)"
        if config["untrained"]
        else f"exit layers distilled by `make model`'s recipe at {config['distill_steps']} steps and "
        f"{config['distill_num_prompts']} prompts (of {config['distill_prompts'] or 'random ids'})"
    )
    mode = "greedy" if config["temperature"] == 0 else f"temperature {config['temperature']}"
    lines = [
        f"### {result['name']}: exit layer N for {model['model_dir']} ({model['layers']} layers)",
        "",
        machine_line(result),
        "",
        f"dtype {model['dtype']}; {heads}; policy {config['policy']}, {mode}; "
        f"{len(config['prompts']['indices'])} held-out prompts ({_prompts_line(config['prompts'])}) x "
        f"{config['max_new_tokens']} new tokens, median of {config['repetitions']} interleaved repetitions; "
        f"distillation {result['distill_s']:.0f} s, measurement {result['measure_s']:.0f} s."
        + (f" Command: `{result['command']}`" if result.get("command") else ""),
        "",
        "| N | tok/s | speedup vs no speculation (range) | tau | per-token acceptance | acceptance at 1, 2, 3 "
        "| mean k | draft ms/token | verify ms/round | distill agreement before -> after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in sorted(result["exit_layers"].items(), key=lambda item: int(item[0])):
        ratios = row["speedup_vs_ours_ar_per_repetition"]
        by_position = ", ".join(f"{a:.2f}" for a in row["acceptance_by_position"][:3])
        distilled = row.get("distill")
        agreement = (
            f"{distilled['before']['agreement']:.2f} -> {distilled['after']['agreement']:.2f}" if distilled else ""
        )
        mark = "**" if int(n) == best["exit_layer"] else ""
        lines.append(
            f"| {mark}{n}{mark} | {row['tokens_per_second']:.1f} | {mark}{row['speedup_vs_ours_ar']:.2f}{mark} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {row['mean_accepted_tokens']:.2f} | {row['acceptance_rate']:.2f} "
            f"| {by_position} | {row['mean_drafted']:.2f} | {row['draft_ms_per_token']:.1f} "
            f"| {row['verify_ms_per_round']:.1f} | {agreement} |"
        )
    lines += [
        f"| no speculation | {result['baseline']['tokens_per_second']:.1f} | 1 | 1 | | | 0 | "
        f"| {result['baseline']['verify_ms_per_round']:.1f} | |",
        "",
        f"Recommended: **N = {best['exit_layer']}** ({best['speedup_vs_ours_ar']:.2f}x), {best['rule']}."
        + ("" if best["speculation_pays"] else " No N is faster than plain decoding here: serve without speculation."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
