"""A benchmark result as a Markdown table (docs/benchmarks.md quotes these)."""

import json
import sys
from pathlib import Path


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"### {result['name']}",
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores available, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}; "
        f"dtype {result.get('dtype', result['config']['dtype'])} ({result['config']['dtype']} requested), "
        f"{result['config']['num_prompts']} prompts x {result['config']['max_new_tokens']} new tokens, "
        f"median of {result['config']['repetitions']} interleaved repetitions.",
        "",
    ]
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
    if result.get("headline"):
        lines += [
            "Headline (greedy): "
            + ", ".join(f"{k} = {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in result["headline"].items()),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
