"""The concurrency sweep of issue #11: output tokens/s, TPOT and TTFT at 1..32 sessions in flight, for
speculation off, fixed k, Beta-TS and the load-aware rule, batched and one session at a time, in-process
and through the whole stack.

Settings (--settings):
  in-process  eesd.engine.SpeculativeEngine.generate_batch on one drafter/verifier pair in this process;
              batched: max_batch = concurrency; single: max_batch = 1 (one session per pass, in turn).
  stack       serving.local_stack.LocalStack (redis unless --memory-store), c clients of the asyncio SDK in
              flight, each streaming; batched: the drafter and verifier run with --max-batch N (--max-batch,
              default 64); single: with --max-batch 1. The node flags of either are --node-flags-batched and
              --node-flags-single ("{max_batch}" is replaced); nodes that lack the flag run as they are and
              the JSON's notes say so.

Every level serves the same requests to every arm, the arms taking turns (arm A at c, arm B at c, ...,
in an order that rotates with the repetition). The requests are the served model's held-out prompts in
turn (serving.models.default_model, or --model-dir), greedy unless --temperature, and exactly
--max-new-tokens each (EOS does not stop them). Clients are closed-loop: c of them, each sending its next
request when its previous one ends. In-process, request i counts as sent when the (i-c+1)-th request
finished (at the start for the first c), so TTFT includes the queueing that one-at-a-time serving imposes
on c clients, as it does through the stack. In-process each arm's load-aware rule starts from fresh pass
timings; the stack's nodes keep measuring across arms, as a server would.

    TTFT = first tokens - sent;  TPOT = (last tokens - first tokens) / (tokens - 1);
    output tokens/s = all tokens of the level / wall time of the level.

Latencies are pooled over --repetitions and tokens/s is the median over them; ratios are medians of the
ratios within each repetition. The machine is shared and noisy, so only ratios within one run mean
anything; the issue's targets are computed and printed as measured facts, never asserted. Writes --out
.json and .png (default bench/results/concurrency).

    python -m bench.concurrency [--concurrency 1,2,4,8,16,32] [--max-new-tokens 64] [--repetitions 1]
                                [--policies off,fixed,beta-ts,load-aware] [--fixed-k 2,4]
                                [--settings in-process,stack] [--batching batched,single] [--max-batch 64]
                                [--dtype auto] [--device cpu] [--threads 1] [--model-dir DIR --exit-layer N]
"""

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.suite import machine, percentile, ratio_of_pairs
from eesd import hardware
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.progress import Progress
from eesd.verifier import Verifier
from loadtest import environment
from serving.local_stack import LocalStack
from serving.models import TINY_PROMPTS, ServedModel, default_model, held_out_prompts

SETTINGS = ("in-process", "stack")
BATCHING = ("batched", "single")
POLICIES = ("off", "fixed", "beta-ts", "load-aware")
NODE_FLAGS = {"batched": "--max-batch {max_batch}", "single": "--max-batch 1"}
# How each arm's line looks in the plots: one color per policy, solid batched, dashed one at a time.
COLORS = {"off": "#7f7f7f", "beta-ts": "#4c72b0", "load-aware": "#c44e52"}
FIXED_COLORS = ["#dd8452", "#937860", "#da8bc3", "#8172b3", "#ccb974"]
LINESTYLES = {"batched": "-", "single": "--"}
BATCH_LABELS = {"batched": "batched", "single": "one at a time"}
MARKERS = {"in-process": "o", "stack": "s"}


def policy_arms(names: list[str], fixed_ks: list[int], k_max: int) -> dict[str, PolicyParams]:
    """Arm name -> the policy every request of that arm asks for."""
    arms = {}
    for name in names:
        if name == "fixed":
            arms.update({f"fixed-{k}": PolicyParams("fixed", k_max, {"k": float(k)}) for k in fixed_ks})
        elif name == "load-aware":
            arms[name] = PolicyParams("beta-ts", k_max, {"load_aware": 1.0})
        elif name in ("off", "beta-ts"):
            arms[name] = PolicyParams(name, k_max)
        else:
            raise ValueError(f"unknown policy arm {name!r}; expected some of {POLICIES}")
    return arms


@dataclass
class Request:
    """One request's tokens and clock readings (perf_counter seconds)."""

    token_ids: list[int]
    sent: float
    first: float
    last: float
    rounds: list[tuple[int, int, int, int]]  # per round: k chosen, drafted, accepted, committed

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.last - self.first) / (len(self.token_ids) - 1) if len(self.token_ids) > 1 else None


@dataclass
class Arm:
    """Everything one arm measured at one level, over the repetitions."""

    tokens_per_second: list[float] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    differing: int = 0  # requests whose tokens differ from the reference arm's for the same prompt
    diverged_at: list[int] = field(default_factory=list)  # the first differing position of each

    def summary(self, greedy: bool) -> dict:
        ttft = [r.ttft * 1e3 for r in self.requests]
        tpot = [t * 1e3 for r in self.requests if (t := r.tpot) is not None]
        e2e = [(r.last - r.sent) * 1e3 for r in self.requests]
        rounds = [x for r in self.requests for x in r.rounds]
        drafted = sum(x[1] for x in rounds)
        return {
            "tokens_per_second": {"median": statistics.median(self.tokens_per_second), "runs": self.tokens_per_second},
            "ttft_ms": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)},
            "tpot_ms": {"p50": percentile(tpot, 0.5), "p99": percentile(tpot, 0.99)},
            "e2e_ms": {"p50": percentile(e2e, 0.5), "p99": percentile(e2e, 0.99)},
            "requests": len(self.requests),
            "tokens": sum(len(r.token_ids) for r in self.requests),
            "rounds": len(rounds),
            # k chosen: the bound each round's policy set (0: no speculation that round).
            "k_histogram": {str(k): n for k, n in sorted(Counter(x[0] for x in rounds).items())},
            "mean_k": sum(x[0] for x in rounds) / len(rounds) if rounds else 0.0,
            "mean_drafted": drafted / len(rounds) if rounds else 0.0,
            "acceptance_rate": sum(x[2] for x in rounds) / drafted if drafted else None,
            "tokens_per_round": sum(x[3] for x in rounds) / len(rounds) if rounds else 0.0,
            "differing_from_reference": self.differing if greedy else None,
            "first_differing_positions": sorted(self.diverged_at) if greedy else None,
        }


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def closed_loop_sent(start: float, finished: list[float], concurrency: int, count: int) -> list[float]:
    """When c closed-loop clients send requests 0..count-1 in order: the first c at `start`, request i at
    the (i-c+1)-th finish."""
    ends = sorted(finished)
    return [start if i < concurrency else ends[i - concurrency] for i in range(count)]


def run_in_process(
    engine: SpeculativeEngine, prompts: list[list[int]], params: list[GenerationParams], concurrency: int, batch: int
) -> tuple[list[Request], float]:
    """The requests through generate_batch with at most `batch` sessions at once; (requests, wall s)."""
    engine.max_batch = batch
    # Each arm measures its own load and acceptance from its first rounds, not what the previous arm left.
    engine.forget()
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def on_tokens(index: int, tokens: list[int]) -> None:
        now = time.perf_counter()
        if tokens:
            first.setdefault(index, now)
            last[index] = now

    start = time.perf_counter()
    results = engine.generate_batch(prompts, params, on_tokens)
    wall = time.perf_counter() - start
    sent = closed_loop_sent(start, list(last.values()), concurrency, len(prompts))
    requests = [
        Request(
            list(result.token_ids),
            sent[i],
            first[i],
            last[i],
            [(r.k_chosen, r.drafted, r.accepted, r.committed) for r in result.stats.per_round],
        )
        for i, result in enumerate(results)
    ]
    return requests, wall


async def _stream_all(address: str, prompts: list[list[int]], options: list[dict], concurrency: int):
    from eesd_client.aio import AsyncEesdClient

    requests: list[Request | None] = [None] * len(prompts)
    queue = iter(range(len(prompts)))

    async def client_loop(client) -> None:
        for i in queue:  # a shared iterator: each client takes the next request when its previous one ended
            sent = time.perf_counter()
            first, last = None, sent
            stream = client.generate(prompts[i], timeout=3600.0, **options[i])
            async for chunk in stream:
                last = time.perf_counter()
                if first is None and chunk.token_ids:
                    first = last
            result = await stream.result()
            rounds = [(r.k_chosen, r.drafted, r.accepted, r.committed) for r in result.rounds]
            requests[i] = Request(list(result.token_ids), sent, last if first is None else first, last, rounds)

    async with AsyncEesdClient(address, timeout=3600.0) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return requests, wall


def run_stack(address: str, prompts: list[list[int]], params: list[GenerationParams], concurrency: int):
    """The requests through the stack's controller with `concurrency` streaming clients; (requests, wall s)."""
    options = [
        {
            "max_new_tokens": p.max_new_tokens,
            "temperature": p.sampling.temperature,
            "seed": p.sampling.seed,
            "policy": p.policy.name,
            "policy_options": dict(p.policy.options),
            "k_max": p.policy.k_max,
            "stop_on_eos": p.stop_on_eos,
        }
        for p in params
    ]
    return asyncio.run(_stream_all(address, prompts, options, concurrency))


def node_flag_support() -> dict[str, bool]:
    """Whether the drafter and verifier take --max-batch (one session per pass is all they did before)."""
    from drafter_service.config import DrafterConfig
    from verifier_service.config import VerifierConfig

    return {
        role: "max_batch" in {f.name for f in dataclasses.fields(config)}
        for role, config in (("drafter", DrafterConfig), ("verifier", VerifierConfig))
    }


def stack_node_flags(
    batching: tuple[str, ...], node_flags: dict[str, str], max_batch: int, support: dict[str, bool], notes: list[str]
) -> dict[str, list[str]]:
    """The drafter and verifier flags of each stack mode. Nodes without --max-batch serve one session per pass:
    stack/batched is then skipped and stack/single runs them as they are; `notes` says so."""
    out = {}
    for mode in batching:
        flags = node_flags[mode].format(max_batch=max_batch).split()
        if "--max-batch" in flags and not all(support.values()):
            lacking = " and ".join(role for role, ok in support.items() if not ok)
            if mode == "batched":
                notes.append(f"stack/batched skipped: the {lacking} take no --max-batch in this tree")
                continue
            notes.append(f"stack/single ran without --max-batch: the {lacking} lack it (one session per pass)")
            at = flags.index("--max-batch")
            flags = flags[:at] + flags[at + 2 :]
        out[mode] = flags
    return out


def run(
    model: ServedModel | None = None,
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    settings: tuple[str, ...] = SETTINGS,
    batching: tuple[str, ...] = BATCHING,
    policies: tuple[str, ...] = POLICIES,
    fixed_ks: tuple[int, ...] = (2, 4),
    max_new_tokens: int = 64,
    requests_per_level: int = 8,
    repetitions: int = 1,
    dtype: str = "",
    device: str = "cpu",
    threads: int = 1,
    redis: bool = True,
    max_batch: int = 64,
    node_flags: dict[str, str] | None = None,
    k_max: int = 8,
    temperature: float = 0.0,
    progress: bool = False,
    results_dir: Path | None = None,
) -> dict:
    """The sweep; `results_dir`: where its results go (their files do not make the recorded tree dirty)."""
    torch.set_num_threads(threads)
    load_start = environment.load_average()
    model = model or default_model()
    dtype = dtype or model.dtype
    arms = policy_arms(list(policies), list(fixed_ks), k_max)
    node_flags = {**NODE_FLAGS, **(node_flags or {})}
    notes = []
    encode = lambda p: p  # noqa: E731 - a model without tokenizer has token-id prompts
    if isinstance(model.prompts[0], str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
        encode = lambda p: tokenizer(p)["input_ids"]  # noqa: E731
    prompt_ids = [encode(p) for p in model.prompts]
    greedy = temperature == 0.0

    stack_flags: dict[str, list[str]] = {}
    if "stack" in settings:
        stack_flags = stack_node_flags(batching, node_flags, max_batch, node_flag_support(), notes)
    modes = [(s, b) for s in settings for b in batching if s == "in-process" or b in stack_flags]

    with contextlib.ExitStack() as exits:
        engine = None
        if "in-process" in settings:
            drafter = Drafter(model.model_dir, model.exit_layer, model.exit_head or None, dtype, device)
            engine = SpeculativeEngine(drafter, Verifier(model.model_dir, dtype, device))
            for policy in arms.values():  # warm-up
                engine.generate_batch(prompt_ids[:2], GenerationParams(8, policy=policy, stop_on_eos=False))
        addresses = {}
        for mode, flags in stack_flags.items():
            stack = LocalStack(model.model_dir, model.exit_layer, model.exit_head, dtype, redis=redis, threads=threads)
            for node in stack.by_role("drafter") + stack.by_role("verifier"):
                node.args += [*flags, "--device", device]
            exits.enter_context(stack)
            addresses[mode] = stack.controller_address
            for policy in arms.values():  # warm-up
                run_stack(stack.controller_address, prompt_ids[:2], [GenerationParams(8, policy=policy)] * 2, 2)

        measured = {c: {mode: {arm: Arm() for arm in arms} for mode in modes} for c in concurrency}
        order = list(itertools.product(modes, arms.items()))
        reference: dict[tuple[int, ...], tuple[str, list[int]]] = {}  # prompt -> (arm, its greedy tokens)
        bar = exits.enter_context(
            Progress(repetitions * len(concurrency) * len(order), "concurrency sweep", unit="run", enabled=progress)
        )
        for repetition in range(repetitions):
            for c in concurrency:
                count = max(c, requests_per_level)
                prompts = list(itertools.islice(itertools.cycle(prompt_ids), count))
                # The arms take turns, in an order that rotates with the repetition, so drift hits all alike.
                shift = repetition % len(order)
                for mode, (name, policy) in order[shift:] + order[:shift]:
                    sampling = SamplingParams(temperature)
                    params = [
                        GenerationParams(
                            max_new_tokens,
                            dataclasses.replace(sampling, seed=None if greedy else i),
                            policy,
                            stop_on_eos=False,
                        )
                        for i in range(count)
                    ]
                    setting, batched = mode
                    if setting == "in-process":
                        requests, wall = run_in_process(engine, prompts, params, c, c if batched == "batched" else 1)
                    else:
                        requests, wall = run_stack(addresses[batched], prompts, params, c)
                    arm = measured[c][mode][name]
                    tps = sum(len(r.token_ids) for r in requests) / wall
                    arm.tokens_per_second.append(tps)
                    arm.requests += requests
                    key = f"{setting}/{batched}/{name}"
                    for prompt, request in zip(prompts, requests, strict=True):
                        ref = reference.setdefault(tuple(prompt), (key, request.token_ids))
                        if ref[1] != request.token_ids:
                            arm.differing += 1
                            arm.diverged_at.append(first_difference(ref[1], request.token_ids))
                    bar.update(run=f"rep {repetition + 1} c={c} {key}", tok_s=f"{tps:.1f}")
    result = {
        "machine": machine(),
        "model": str(model.model_dir),
        "exit_layer": model.exit_layer,
        "exit_head": model.exit_head,
        "dtype": hardware.dtype_name(dtype, device),
        "dtype_requested": dtype,
        "device": device,
        "source_tree": environment.source_tree(results_dir),
        "torch_threads": threads,
        "threads_per_process": threads,
        "load_average": {"start": load_start, "end": environment.load_average()},
        "state_store": ("redis" if redis else "memory") if stack_flags else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "k_max": k_max,
        "repetitions": repetitions,
        "concurrency": list(concurrency),
        "requests_per_level": {str(c): max(c, requests_per_level) for c in concurrency},
        "policies": {name: {"policy": p.name, "options": dict(p.options)} for name, p in arms.items()},
        "modes": {
            "in-process": {"batched": "max_batch = concurrency", "single": "max_batch = 1"},
            "stack": {mode: " ".join(flags) for mode, flags in stack_flags.items()},
        },
        "settings": sorted({s for s, _ in modes}, key=SETTINGS.index),
        "stack_nodes_take_max_batch": node_flag_support() if "stack" in settings else None,
        "notes": notes,
        "definitions": {
            "tokens_per_second": "all output tokens of a level / its wall time (median over repetitions)",
            "ttft_ms": "first streamed tokens - request sent (closed-loop clients; in-process, request i counts "
            "as sent at the (i-c+1)-th finish), p50/p99 over all requests of the repetitions",
            "tpot_ms": "(last tokens - first tokens) / (tokens - 1)",
            "e2e_ms": "last tokens - request sent",
            "k_histogram": "rounds per k the policy chose (0: no speculation that round)",
            "differing_from_reference": "requests whose greedy tokens differ from the first arm that served the "
            "same prompt (reference_arms), and where each first differs; null when sampling. In bf16 a "
            "near-tie may resolve differently in passes of other shapes; in fp32 it is a bug",
        },
        "reference_arms": sorted({arm for arm, _ in reference.values()}),
        "levels": {
            str(c): {
                setting: {
                    batched: {name: arm.summary(greedy) for name, arm in by_mode[(setting, batched)].items()}
                    for s, batched in modes
                    if s == setting
                }
                for setting in SETTINGS
                if any(s == setting for s, _ in modes)
            }
            for c, by_mode in measured.items()
        },
    }
    result["checks"] = checks(result)
    return result


def _rates(result: dict, c: int, setting: str, batched: str, arm: str) -> list[float] | None:
    try:
        return result["levels"][str(c)][setting][batched][arm]["tokens_per_second"]["runs"]
    except KeyError:
        return None


def checks(result: dict) -> dict:
    """The issue's targets, as measured ratios (tokens/s, medians of per-repetition ratios) and whether met."""
    levels = result["concurrency"]
    policies = list(result["policies"])
    fixed = [p for p in policies if p.startswith("fixed-")]
    out: dict = {}
    # 1. At 16 sessions, stack tokens/s >= 4x that of 1 session (same policy); the largest level stands in.
    high = 16 if 16 in levels else max(levels)
    if 1 in levels and high > 1:
        mode = next((m for m in BATCHING if m in result["modes"]["stack"]), None)
        setting = "stack" if mode is not None else "in-process"
        mode = mode or "batched"
        ratios = {}
        for policy in policies:
            top, one = _rates(result, high, setting, mode, policy), _rates(result, 1, setting, mode, policy)
            if top and one:
                r = ratio_of_pairs(top, one)
                ratios[policy] = {"ratio": r, "met": r >= 4.0}
        out["many_over_one_session"] = {"setting": f"{setting}/{mode}", "levels": [1, high], "target": 4.0, **ratios}
    # 2. Load-aware >= max(off, best fixed k) at every level; 3. and >= 1.5x off at 1 and 2 sessions.
    if "load-aware" in policies and ("off" in policies or fixed):
        against, over_off = {}, {}
        for setting, modes in result["levels"][str(levels[0])].items():
            for mode in modes:
                key = f"{setting}/{mode}"
                against[key], over_off[key] = {}, {}
                for c in levels:
                    aware = _rates(result, c, setting, mode, "load-aware")
                    others = {p: _rates(result, c, setting, mode, p) for p in ["off", *fixed] if p in policies}
                    best = max(others, key=lambda p: statistics.median(others[p]))
                    r = ratio_of_pairs(aware, others[best])
                    against[key][str(c)] = {"ratio": r, "best_other": best, "met": r >= 1.0}
                    if c in (1, 2) and "off" in others:
                        r = ratio_of_pairs(aware, others["off"])
                        over_off[key][str(c)] = {"ratio": r, "met": r >= 1.5}
        out["load_aware_over_best_of_off_and_fixed"] = {"target": 1.0, **against}
        if any(over_off.values()):
            out["load_aware_over_off"] = {"target": 1.5, **over_off}
    # 4. One session alone: batched over one at a time, in the same run.
    if 1 in levels:
        alone = {}
        for setting, modes in result["levels"]["1"].items():
            if set(BATCHING) <= set(modes):
                alone[setting] = {}
                for policy in policies:
                    batched, single = (_rates(result, 1, setting, m, policy) for m in BATCHING)
                    r = ratio_of_pairs(batched, single)
                    alone[setting][policy] = {"ratio": r, "met": r >= 1.0}
        if alone:
            out["one_session_batched_over_single"] = {"target": 1.0, **alone}
    return out


def check_lines(result: dict) -> list[str]:
    lines = []
    verdict = lambda v: "met" if v["met"] else "MISSED"  # noqa: E731
    checks_ = result["checks"]
    if "many_over_one_session" in checks_:
        ch = checks_["many_over_one_session"]
        low, high = ch["levels"]
        for policy, v in ((p, v) for p, v in ch.items() if isinstance(v, dict)):
            lines.append(
                f"{ch['setting']} {policy}: {high} sessions / {low} = {v['ratio']:.2f}x "
                f"(target >= {ch['target']}x: {verdict(v)})"
            )
    for name, what in (
        ("load_aware_over_best_of_off_and_fixed", "load-aware / best of off and fixed"),
        ("load_aware_over_off", "load-aware / off"),
    ):
        ch = checks_.get(name, {})
        for mode, by_level in ((m, v) for m, v in ch.items() if isinstance(v, dict)):
            parts = ", ".join(
                f"c={c} {v['ratio']:.2f}x{' vs ' + v['best_other'] if 'best_other' in v else ''} {verdict(v)}"
                for c, v in by_level.items()
            )
            lines.append(f"{mode} {what} (target >= {ch['target']}x): {parts}")
    ch = checks_.get("one_session_batched_over_single", {})
    for setting, by_policy in ((s, v) for s, v in ch.items() if isinstance(v, dict)):
        parts = ", ".join(f"{p} {v['ratio']:.2f}x {verdict(v)}" for p, v in by_policy.items())
        lines.append(f"{setting} one session, batched / one at a time (target >= 1x): {parts}")
    return lines


def arm_color(policy: str, policies: list[str]) -> str:
    fixed = [p for p in policies if p.startswith("fixed-")]
    return COLORS.get(policy) or FIXED_COLORS[fixed.index(policy) % len(FIXED_COLORS)]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = result["settings"]
    policies = list(result["policies"])
    levels = result["concurrency"]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(6 * (len(settings) + 1), 4.8))
    latency = axes[-1]
    for ax, setting in zip(axes, settings, strict=False):
        for mode in result["levels"][str(levels[0])][setting]:
            for policy in policies:
                arms = [result["levels"][str(c)][setting][mode][policy] for c in levels]
                rates = [a["tokens_per_second"]["median"] for a in arms]
                style = dict(color=arm_color(policy, policies), linestyle=LINESTYLES[mode], marker=MARKERS[setting])
                ax.plot(levels, rates, **style)
                latency.plot(rates, [a["tpot_ms"]["p50"] for a in arms], alpha=0.8, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("sessions in flight")
        ax.set_ylabel("output tokens/s (median)")
        ax.set_title(f"{setting}: throughput (solid batched, dashed one at a time)", fontsize=9)
    latency.set_xlabel("output tokens/s (median)")
    latency.set_ylabel("TPOT p50 (ms)")
    latency.set_title(
        f"throughput vs latency (o in-process, s stack; points: {levels[0]}..{levels[-1]} sessions)", fontsize=9
    )
    m = result["machine"]
    flags = ",".join(f for f, present in m.get("cpu_flags", {}).items() if present)
    commit = result["source_tree"]["commit"]
    fig.suptitle(
        f"{Path(result['model']).name} N={result['exit_layer']} {result['dtype']}, {result['max_new_tokens']} new "
        f"tokens, commit {commit} — {m['cpu']}, {m['cores_available']} cores [{flags}], "
        f"{result['torch_threads']} torch thread(s)/process",
        fontsize=8,
    )
    # One legend for all panels: a color per policy, a line style per batching, a marker per setting.
    handles = [Line2D([], [], color=arm_color(p, policies), label=p) for p in policies]
    handles += [Line2D([], [], color="black", linestyle=LINESTYLES[m], label=BATCH_LABELS[m]) for m in BATCHING]
    handles += [Line2D([], [], color="black", marker=MARKERS[s], linestyle="", label=s) for s in settings]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress lines off a terminal
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,2,4,8,16,32", help="sessions in flight per level (comma list)")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"arms, some of {','.join(POLICIES)}")
    parser.add_argument("--fixed-k", default="2,4", help="the k of each fixed arm (comma list)")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="in-process, stack or both")
    parser.add_argument("--no-stack", action="store_true", help="in-process only (= --settings in-process)")
    parser.add_argument("--batching", default=",".join(BATCHING), help="batched, single (one at a time) or both")
    parser.add_argument("--max-batch", type=int, default=64, help="the batched stack nodes' --max-batch")
    for mode, flags in NODE_FLAGS.items():
        parser.add_argument(f"--node-flags-{mode}", default=flags, help=f"drafter and verifier flags of stack/{mode}")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=8, help="requests per arm and level (>= c)")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: seeded per request")
    parser.add_argument("--dtype", default="", help="default: the served model's (auto with --model-dir)")
    parser.add_argument("--device", default="cpu", help=f"the drafters' and verifiers': {hardware.DEVICE_HELP}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and per stack process")
    parser.add_argument("--memory-store", action="store_true", help="embedded state store instead of redis-server")
    parser.add_argument("--model-dir", help="default: serving.models.default_model() (reference model once built)")
    parser.add_argument("--exit-layer", type=int)
    parser.add_argument("--exit-head", default="")
    parser.add_argument("--out", default="bench/results/concurrency")
    args = parser.parse_args()
    hardware.check_device(args.device)
    model = None
    if args.model_dir:
        if args.exit_layer is None:
            parser.error("--exit-layer is required with --model-dir")
        model_dir = Path(args.model_dir)
        has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        prompts = (held_out_prompts(model_dir) if has_tokenizer else []) or TINY_PROMPTS
        model = ServedModel(model_dir, args.exit_layer, args.exit_head, args.dtype or "auto", prompts)
    result = run(
        model,
        ints(args.concurrency),
        ("in-process",) if args.no_stack else names(args.settings),
        names(args.batching),
        names(args.policies),
        ints(args.fixed_k),
        args.max_new_tokens,
        args.requests_per_level,
        args.repetitions,
        args.dtype,
        args.device,
        args.threads,
        not args.memory_store,
        args.max_batch,
        {"batched": args.node_flags_batched, "single": args.node_flags_single},
        args.k_max,
        args.temperature,
        progress=True,
        results_dir=Path(args.out).parent,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for note in result["notes"]:
        print(f"note: {note}")
    for c, by_setting in result["levels"].items():
        for setting, by_mode in by_setting.items():
            for mode, by_policy in by_mode.items():
                for policy, m in by_policy.items():
                    print(
                        f"c={c:<3s} {setting}/{mode}/{policy:11s} {m['tokens_per_second']['median']:8.1f} tok/s  "
                        f"TPOT p50 {m['tpot_ms']['p50']:7.1f} p99 {m['tpot_ms']['p99']:7.1f} ms  "
                        f"TTFT p50 {m['ttft_ms']['p50']:8.1f} p99 {m['ttft_ms']['p99']:8.1f} ms  "
                        f"mean k {m['mean_k']:.2f}  differing {m['differing_from_reference']}"
                    )
    for line in check_lines(result):
        print(line)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
