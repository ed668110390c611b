"""Latency and throughput statistics of a run, goodput under an SLO, and the report's JSON and PNG plots.

Definitions (as vLLM's benchmark_serving, per streamed chunk since one round streams several tokens):
TTFT = first token-bearing chunk - request sent; TPOT = (e2e - TTFT) / (output tokens - 1) per request;
ITL = gap between consecutive token-bearing chunks of a request; e2e = request sent -> summary received.
"""

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from loadtest.runner import Load, RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2e")  # milliseconds


@dataclass(frozen=True)
class Slo:
    """A request is good when it meets every bound given (ms); goodput counts good requests per second."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Slo":
        """ "ttft=500,tpot=50,e2e=10000" (any subset)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in SLO_KEYS:
                raise ValueError(f"SLO keys are {SLO_KEYS}, got {key!r}")
            values[f"{key}_ms"] = float(value)
        return cls(**values)

    def met(self, metrics: Mapping[str, float | None]) -> bool:
        for key in SLO_KEYS:
            bound = getattr(self, f"{key}_ms")
            if bound is not None and (metrics[key] is None or metrics[key] > bound):
                return False
        return True


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": len(a), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def request_metrics(r: RequestRecord) -> dict[str, float | None]:
    """TTFT, TPOT and e2e of one successful request, in ms."""
    ttft = r.chunk_s[0] * 1e3 if r.chunk_s else None
    e2e = r.e2e_s * 1e3 if r.e2e_s is not None else None
    tokens = r.received_tokens
    tpot = (e2e - ttft) / (tokens - 1) if ttft is not None and e2e is not None and tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e}


def _sum_lists(lists: Sequence[Sequence[int]]) -> list[int]:
    out = [0] * max((len(x) for x in lists), default=0)
    for x in lists:
        for i, v in enumerate(x):
            out[i] += v
    return out


def client_speculation(done: Sequence[RequestRecord]) -> dict:
    """Speculation stats summed from the per-request summaries the client received."""
    rounds, drafted, accepted = (sum(getattr(r, f) for r in done) for f in ("rounds", "drafted", "accepted"))
    committed = sum(r.completion_tokens for r in done)
    k_histogram = sum((Counter(r.k_histogram) for r in done), Counter())
    drafted_at, accepted_at = _sum_lists([r.drafted_at for r in done]), _sum_lists([r.accepted_at for r in done])
    split = {k: sum(r.time_split_ms.get(k, 0.0) for r in done) for k in ("draft", "verify", "transport", "controller")}
    return {
        "rounds": rounds,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_tokens": committed / rounds if rounds else None,
        "acceptance_by_position": [a / d for a, d in zip(accepted_at, drafted_at, strict=True) if d],
        "k_histogram": {str(k): v for k, v in sorted(k_histogram.items())},
        "round_time_ms": split,
    }


def _rounded(values) -> list[float | None]:
    return [round(v, 2) if v is not None else None for v in values]


def summarize(
    load: Load, records: Sequence[RequestRecord], wall_s: float, slo: Slo, server: dict | None = None
) -> dict:
    """The report of one run."""
    done = [r for r in records if r.ok]
    per_request = [request_metrics(r) for r in done]
    output_tokens = sum(r.received_tokens for r in done)
    good = sum(slo.met(m) for m in per_request)
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.chunk_s, r.chunk_s[1:], strict=False)]
    return {
        "name": load.name,
        "load": asdict(load),
        "slo_ms": asdict(slo),
        "requests": {
            "issued": len(records),
            "completed": len(done),
            "failed": len(records) - len(done),
            "errors": dict(Counter(r.error for r in records if not r.ok)),
        },
        "duration_s": wall_s,
        "request_throughput": len(done) / wall_s if wall_s > 0 else 0.0,
        "output_token_throughput": output_tokens / wall_s if wall_s > 0 else 0.0,
        "goodput": {
            "requests_per_s": good / wall_s if wall_s > 0 else 0.0,
            "good_requests": good,
            "fraction": good / len(done) if done else 0.0,
        },
        "tokens": {
            "prompt": sum(r.prompt_tokens for r in done),
            "output": output_tokens,  # what the SDK received, chunk by chunk
            "output_in_results": sum(r.result_tokens for r in done),
            "output_in_summaries": sum(r.completion_tokens for r in done),
            "chunks": sum(len(r.chunk_tokens) for r in done),
        },
        "ttft_ms": distribution([m["ttft"] for m in per_request if m["ttft"] is not None]),
        "tpot_ms": distribution([m["tpot"] for m in per_request if m["tpot"] is not None]),
        "itl_ms": distribution(itl),
        "e2e_ms": distribution([m["e2e"] for m in per_request if m["e2e"] is not None]),
        "tokens_per_chunk": distribution([t for r in done for t in r.chunk_tokens]),
        "speculation_client": client_speculation(done),
        "speculation_server": server,
        "samples_ms": {  # raw values (0.01 ms) for the CDF plots
            "ttft": _rounded(m["ttft"] for m in per_request),
            "tpot": _rounded(m["tpot"] for m in per_request),
            "itl": _rounded(itl),
            "e2e": _rounded(m["e2e"] for m in per_request),
        },
    }


def write_report(report: dict, out_dir: Path, stem: str = "loadtest") -> list[Path]:
    """JSON plus PNG plots (latency CDFs; throughput and TPOT against concurrency when a sweep has several)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    text = json.dumps(report, indent=1, default=float)
    json_path.write_text(re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", " ", m.group()), text) + "\n")
    written = [json_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    runs = report["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key in zip(axes, ("ttft", "tpot", "itl", "e2e"), strict=True):
        for run in runs:
            values = np.sort([v for v in run["samples_ms"][key] if v is not None])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run["name"])
        ax.set(title=f"{key.upper()} CDF", xlabel="ms", ylabel="fraction of requests" if key != "itl" else "")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_latency_cdf.png", dpi=90)
    plt.close(fig)
    written.append(out_dir / f"{stem}_latency_cdf.png")
    closed = [r for r in runs if r["load"]["concurrency"] is not None]
    if len({r["load"]["concurrency"] for r in closed}) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        levels = sorted({r["load"]["concurrency"] for r in closed})
        for spec, color in (("on", "C0"), ("off", "C1")):
            series = sorted((r for r in closed if r["name"].endswith(spec)), key=lambda r: r["load"]["concurrency"])
            if not series:
                continue
            x, style = [r["load"]["concurrency"] for r in series], dict(color=color, marker="o")
            axes[0].plot(x, [r["output_token_throughput"] for r in series], **style, label=f"speculation {spec}")
            axes[1].plot(x, [r["tpot_ms"]["p50"] for r in series], **style, label=f"p50, speculation {spec}")
            axes[1].plot(x, [r["tpot_ms"]["p90"] for r in series], **style, ls="--", label=f"p90, speculation {spec}")
            axes[2].plot(x, [r["goodput"]["requests_per_s"] for r in series], **style, label=f"speculation {spec}")
        for ax, title, unit in zip(
            axes,
            ("output throughput", "TPOT", "goodput"),
            ("tokens/s", "ms", "good requests/s"),
            strict=True,
        ):
            ax.set(title=f"{title} vs concurrency", xlabel="concurrent clients", ylabel=unit)
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_vs_concurrency.png", dpi=90)
        plt.close(fig)
        written.append(out_dir / f"{stem}_vs_concurrency.png")
    return written
