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
    """Speculation stats summed from the per-request summaries the client received; the k histogram,
    acceptance by position and round time split are None when the responses did not carry them (HTTP)."""
    rounds, drafted, accepted = (sum(getattr(r, f) for r in done) for f in ("rounds", "drafted", "accepted"))
    committed = sum(r.completion_tokens for r in done)
    out = {
        "rounds": rounds,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_tokens": committed / rounds if rounds else None,
        "acceptance_by_position": None,
        "k_histogram": None,
        "round_time_ms": None,
    }
    if any(r.k_histogram is None for r in done):
        return out
    k_histogram = sum((Counter(r.k_histogram) for r in done), Counter())
    drafted_at, accepted_at = _sum_lists([r.drafted_at for r in done]), _sum_lists([r.accepted_at for r in done])
    split = {k: sum(r.time_split_ms.get(k, 0.0) for r in done) for k in ("draft", "verify", "transport", "controller")}
    out["acceptance_by_position"] = [a / d for a, d in zip(accepted_at, drafted_at, strict=True) if d]
    out["k_histogram"] = {str(k): v for k, v in sorted(k_histogram.items())}
    out["round_time_ms"] = split
    return out


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


def caption(environment: Mapping | None) -> str:
    """One or two lines naming what a report ran on: model, commit, machine, load average (plot titles)."""
    env = environment or {}
    model = env.get("model") or {}
    if model.get("name"):
        shape = ", ".join(
            part
            for part in (
                model.get("architecture"),
                f"{model['layers']} layers" if model.get("layers") else None,
                f"d={model['hidden']}" if model.get("hidden") else None,
                model.get("dtype"),
                f"exit N={model['exit_layer']}" if model.get("exit_layer") is not None else None,
                ("distilled head" if model.get("exit_head") else "untrained exit layer")
                if model.get("exit_layer") is not None
                else None,
            )
            if part
        )
        model_text = f"{model['name']} ({shape})" if shape else model["name"]
    else:
        model_text = "model unknown"
    machine = env.get("machine") or {}
    flags = [f for f, on in (machine.get("cpu_flags") or {}).items() if on and f in ("avx512_bf16", "amx_bf16")]
    machine_text = ", ".join(
        str(part)
        for part in (
            machine.get("cpu"),
            f"{machine['cores_available']} cores" if machine.get("cores_available") else None,
            f"{machine['memory_gb']:g} GB" if machine.get("memory_gb") else None,
            "+".join(flags) if flags else None,
        )
        if part
    )
    load = env.get("load_average") or {}
    start, end = load.get("start") or [], load.get("end") or []
    load_text = "load avg (1 min) " + " -> ".join(f"{x[0]:.2f}" for x in (start, end) if x) if start or end else ""
    commit = env.get("commit") or "unknown"
    first = f"{model_text} | commit {commit}"
    second = " | ".join(part for part in (machine_text or "machine unknown", load_text, env.get("time_start")) if part)
    return f"{first}\n{second}"


def _slo_line(ax, bound: float | None, orientation: str = "h") -> None:
    if bound is None:
        return
    style = dict(color="red", ls=":", lw=1.2, label=f"SLO {bound:g} ms")
    (ax.axhline if orientation == "h" else ax.axvline)(bound, **style)


def _spec(run: Mapping) -> str:
    return "off" if run["name"].endswith("-spec-off") else "on"


def _shape(run: Mapping) -> tuple[str, float]:
    """("c", concurrency) for a closed-loop run, ("r", rate) for an open-loop one."""
    c = run["load"]["concurrency"]
    return ("c", c) if c is not None else ("r", run["load"]["rate"])


SPEC_COLOURS = {"on": "C0", "off": "C1"}
LATENCY_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "e2e latency"))


def figures(report: Mapping) -> dict:
    """The report's matplotlib figures by file suffix: latency CDFs (SLOs as vertical lines), latency and
    throughput against concurrency when a sweep has several (SLOs as horizontal lines), and the
    throughput-latency curve (output tokens/s against TTFT, TPOT and e2e p50/p99, one point per load level,
    speculation on and off; SLOs as horizontal lines). Titles name the model, commit, machine and load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    slo = report.get("environment", {}).get("slo_ms") or (runs[0]["slo_ms"] if runs else {})
    title = caption(report.get("environment"))
    out = {}

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    for ax, key in zip(axes, ("ttft", "tpot", "itl", "e2e"), strict=True):
        for run in runs:
            values = np.sort([v for v in run["samples_ms"][key] if v is not None])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run["name"])
        _slo_line(ax, slo.get(f"{key}_ms"), "v")
        ax.set(title=f"{key.upper()} CDF", xlabel="ms", ylabel="fraction of requests" if key != "itl" else "")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run whose every request failed draws nothing to label
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out["latency_cdf"] = fig

    closed = [r for r in runs if r["load"]["concurrency"] is not None]
    levels = sorted({r["load"]["concurrency"] for r in closed})
    if len(levels) > 1:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
        for spec, color in SPEC_COLOURS.items():
            series = sorted((r for r in closed if _spec(r) == spec), key=lambda r: r["load"]["concurrency"])
            if not series:
                continue
            x, style = [r["load"]["concurrency"] for r in series], dict(color=color, marker="o")
            axes[0].plot(x, [r["output_token_throughput"] for r in series], **style, label=f"speculation {spec}")
            for ax, key in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
                ax.plot(x, [r[key]["p50"] for r in series], **style, label=f"p50, speculation {spec}")
                ax.plot(x, [r[key]["p99"] for r in series], **style, ls="--", label=f"p99, speculation {spec}")
            axes[3].plot(x, [r["goodput"]["requests_per_s"] for r in series], **style, label=f"speculation {spec}")
        _slo_line(axes[1], slo.get("ttft_ms"))
        _slo_line(axes[2], slo.get("tpot_ms"))
        bounds = ", ".join(f"{k.upper()} <= {slo[f'{k}_ms']:g} ms" for k in SLO_KEYS if slo.get(f"{k}_ms") is not None)
        for ax, name, unit in zip(
            axes,
            ("output throughput", "TTFT", "TPOT", "goodput"),
            ("tokens/s", "ms", "ms", "good requests/s"),
            strict=True,
        ):
            ax.set(title=f"{name} vs concurrency", xlabel="concurrent clients", ylabel=unit)
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[3].set_title(f"goodput vs concurrency\nSLO: {bounds or 'none'}", fontsize=10)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        out["vs_concurrency"] = fig

    if runs:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for ax, (key, name) in zip(axes, LATENCY_PANELS, strict=True):
            for spec, color in SPEC_COLOURS.items():
                for kind, marker in (("c", "o"), ("r", "s")):
                    series = sorted((r for r in runs if _spec(r) == spec and _shape(r)[0] == kind), key=_shape)
                    if not series:
                        continue
                    x = [r["output_token_throughput"] for r in series]
                    loop = "" if kind == "c" else " (open loop)"
                    style = dict(color=color, marker=marker)
                    for q, ls in (("p50", "-"), ("p99", "--")):
                        y = [r[f"{key}_ms"][q] for r in series]
                        ax.plot(x, y, **style, ls=ls, label=f"{q}, spec {spec}{loop}")
                    for r, xi in zip(series, x, strict=True):
                        level = _shape(r)
                        ax.annotate(
                            f"{level[0]}{level[1]:g}",
                            (xi, r[f"{key}_ms"]["p50"] or 0.0),
                            textcoords="offset points",
                            xytext=(4, 4),
                            fontsize=7,
                            color=color,
                        )
            _slo_line(ax, slo.get(f"{key}_ms"))
            ax.set(title=f"{name} vs output throughput", xlabel="output tokens/s", ylabel=f"{name} ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title + "\npoints: load levels (c = concurrent clients, r = requests/s)", fontsize=9)
        fig.tight_layout()
        out["throughput_latency"] = fig
    return out


def write_report(report: dict, out_dir: Path, stem: str = "loadtest") -> list[Path]:
    """JSON plus the PNG plots of `figures` (`<stem>_<suffix>.png`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    text = json.dumps(report, indent=1, default=float)
    json_path.write_text(re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", " ", m.group()), text) + "\n")
    written = [json_path]
    try:
        import matplotlib.pyplot as plt

        plots = figures(report)
    except ImportError:
        return written
    for suffix, fig in plots.items():
        path = out_dir / f"{stem}_{suffix}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
