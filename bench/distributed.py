"""Distributed stack vs in-process engine at one session, where a round's time goes, and pipelined
drafting under concurrent sessions.

Three arms on the same model, prompts, policy and dtype: the in-process engine, the stack with pipelined
drafting (the default) and the stack without it (drafter --pipeline false). At one session they run
interleaved prompt by prompt; at each --concurrency above 1 the two stacks take turns serving the same
batch of requests with that many clients in flight (the in-process engine serves one session only).
The machine is shared and noisy, so only ratios within one run mean anything. Writes
bench/results/distributed.json and .png.

    python -m bench.distributed [--repetitions 3] [--max-new-tokens 96] [--policy beta-ts] [--dtype float32]
                                [--concurrency 4,8]
"""

import argparse
import contextlib
import itertools
import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from eesd_client import EesdClient

from bench.suite import machine, percentile, ratio_of_pairs
from eesd import hardware
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams
from eesd.progress import Progress
from eesd.verifier import Verifier
from loadtest import environment
from loadtest.scrape import P, scrape
from serving.local_stack import LocalStack
from serving.models import ServedModel, default_model

ARMS = {"pipelined": (), "unpipelined": ("--pipeline", "false")}  # distributed arm -> drafter flags
SPLIT = ("draft", "verify", "transport", "controller")


def concurrent_rate(client: EesdClient, requests: list[list[int]], concurrency: int, **kwargs) -> float:
    """Output tokens/s of `requests` served with `concurrency` clients in flight."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda ids: client.generate_text(ids, **kwargs), requests))
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)


def run(
    repetitions: int,
    max_new_tokens: int,
    policy: str,
    prompts: int,
    threads: int,
    redis: bool,
    dtype: str,
    concurrency: list[int],
    model: ServedModel | None = None,
    progress: bool = False,
    results_dir: Path | None = None,
) -> dict:
    """The comparison; `results_dir`: where its results go (their files do not make the recorded tree dirty)."""
    load_start = environment.load_average()
    torch.set_num_threads(threads)
    model = model or default_model()
    dtype = dtype or model.dtype
    engine = SpeculativeEngine(
        Drafter(model.model_dir, model.exit_layer, model.exit_head or None, dtype), Verifier(model.model_dir, dtype)
    )
    prompt_list = model.prompts[:prompts]
    encode = lambda p: p  # noqa: E731 - a model without tokenizer has token-id prompts
    if isinstance(prompt_list[0], str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
        encode = lambda p: tokenizer(p)["input_ids"]  # noqa: E731
    params = GenerationParams(max_new_tokens, policy=PolicyParams(policy))
    with contextlib.ExitStack() as stacks:
        clients, stacks_by_arm = {}, {}
        for arm, drafter_args in ARMS.items():
            stack = stacks.enter_context(
                LocalStack(
                    model.model_dir,
                    model.exit_layer,
                    model.exit_head,
                    dtype,
                    redis=redis,
                    threads=threads,
                    drafter_args=drafter_args,
                )
            )
            stacks_by_arm[arm] = stack
            clients[arm] = stacks.enter_context(EesdClient(stack.controller_address))
            clients[arm].generate_text(encode(prompt_list[0]), max_new_tokens=8, policy=policy)  # warm-up
        engine.generate(encode(prompt_list[0]), GenerationParams(8, policy=PolicyParams(policy)))
        drafter_metrics = [n.metrics_url for n in stacks_by_arm["pipelined"].by_role("drafter")]
        lookaheads_before = scrape(drafter_metrics)
        rates = {arm: [] for arm in ("in_process", *ARMS)}
        split = {arm: {name: [] for name in SPLIT} for arm in rates}
        differing = {arm: 0 for arm in ARMS}  # prompts whose tokens differ from the in-process engine's
        steps = repetitions * (len(prompt_list) + sum(c > 1 for c in concurrency))  # prompts, then load levels
        bar = stacks.enter_context(Progress(steps, "distributed", enabled=progress))
        for _ in range(repetitions):
            totals = {arm: [0, 0.0] for arm in rates}
            for prompt in prompt_list:
                ids = encode(prompt)
                start = time.perf_counter()
                local = engine.generate(ids, params)
                totals["in_process"][0] += len(local.token_ids)
                totals["in_process"][1] += time.perf_counter() - start
                for r in local.stats.per_round:
                    split["in_process"]["draft"].append(r.draft_s * 1e3)
                    split["in_process"]["verify"].append(r.verify_s * 1e3)
                for arm, client in clients.items():
                    start = time.perf_counter()
                    remote = client.generate_text(ids, max_new_tokens=max_new_tokens, policy=policy)
                    totals[arm][0] += len(remote.token_ids)
                    totals[arm][1] += time.perf_counter() - start
                    differing[arm] += list(remote.token_ids) != local.token_ids
                    for r in remote.rounds:
                        for name in SPLIT:
                            split[arm][name].append(getattr(r, f"{name}_ms"))
                bar.update()
            for arm, (tokens, seconds) in totals.items():
                rates[arm].append(tokens / seconds)
        lookaheads = scrape(drafter_metrics) - lookaheads_before
        concurrent = {c: {arm: [] for arm in ARMS} for c in concurrency if c > 1}
        for c, arm_rates in concurrent.items():
            requests = list(itertools.islice(itertools.cycle(map(encode, model.prompts)), max(2 * c, 8)))
            for _ in range(repetitions):
                for arm, client in clients.items():
                    arm_rates[arm].append(
                        concurrent_rate(client, requests, c, max_new_tokens=max_new_tokens, policy=policy)
                    )
                bar.update()
    medians = {arm: statistics.median(values) for arm, values in rates.items()}
    return {
        "machine": machine(),
        "source_tree": environment.source_tree(results_dir),
        "load_average": {"start": load_start, "end": environment.load_average()},
        "model": str(model.model_dir),
        "exit_layer": model.exit_layer,
        "dtype": hardware.dtype_name(dtype),
        "dtype_requested": dtype,
        "policy": policy,
        "prompts": len(prompt_list),
        "max_new_tokens": max_new_tokens,
        "repetitions": repetitions,
        "threads_per_process": threads,
        "state_store": "redis" if redis else "memory",
        "tokens_per_second": {arm: {"median": medians[arm], "runs": values} for arm, values in rates.items()},
        "over_in_process": {arm: ratio_of_pairs(rates[arm], rates["in_process"]) for arm in ARMS},
        "runs_differing_from_in_process": differing,
        # How the pipelined drafter's lookaheads ended over the one-session runs.
        "lookaheads": {
            outcome: lookaheads.total(P + "drafter_lookaheads_total", outcome=outcome)
            for outcome in ("used", "dropped", "skipped")
        },
        "round_ms": {
            arm: {
                name: {"p50": percentile(v, 0.5), "p90": percentile(v, 0.9), "p99": percentile(v, 0.99)}
                for name, v in parts.items()
                if v
            }
            for arm, parts in split.items()
        },
        "rounds": {arm: len(parts["verify"]) for arm, parts in split.items()},
        "concurrent_tokens_per_second": {
            str(c): {arm: {"median": statistics.median(v), "runs": v} for arm, v in arm_rates.items()}
            for c, arm_rates in concurrent.items()
        },
        "concurrent_pipelined_over_unpipelined": {
            str(c): ratio_of_pairs(r["pipelined"], r["unpipelined"]) for c, r in concurrent.items()
        },
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, load) = plt.subplots(1, 3, figsize=(15, 4))
    arms = list(result["tokens_per_second"])
    colors = ["#4c72b0", "#dd8452", "#c44e52"]
    left.bar(arms, [result["tokens_per_second"][a]["median"] for a in arms], color=colors)
    left.set_ylabel("tokens/s (median)")
    ratios = ", ".join(f"{a} {r:.2f}x" for a, r in result["over_in_process"].items())
    left.set_title(f"one session, {result['policy']}: {ratios}", fontsize=9)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        parts = result["round_ms"][arm]
        positions = [j + (i - 1) * width for j in range(len(SPLIT))]
        right.bar(positions, [parts.get(p, {}).get("p50", 0.0) for p in SPLIT], width, color=colors[i], label=arm)
    right.set_xticks(range(len(SPLIT)), SPLIT)
    right.set_ylabel("ms per round (p50), as the nodes report it")
    right.set_title("where a round's time goes")
    right.legend()
    levels = [1, *map(int, result["concurrent_tokens_per_second"])]
    for i, arm in enumerate(ARMS, start=1):
        rates = [result["tokens_per_second"][arm]["median"]]
        rates += [result["concurrent_tokens_per_second"][str(c)][arm]["median"] for c in levels[1:]]
        load.plot(levels, rates, marker="o", color=colors[i], label=arm)
    load.set_xlabel("sessions in flight")
    load.set_ylabel("output tokens/s (median)")
    load.set_title("pipelined drafting under load")
    load.legend()
    fig.suptitle(
        f"{result['model']} N={result['exit_layer']} {result['dtype']}, commit {result['source_tree']['commit']} — "
        f"{result['machine']['cpu']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress lines off a terminal
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--policy", default="beta-ts")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: robust on a loaded machine)"
    )
    parser.add_argument("--dtype", default="", help="override the served model's dtype (e.g. float32)")
    parser.add_argument("--concurrency", default="4,8", help="sessions in flight for the load part (comma list)")
    parser.add_argument("--memory-store", action="store_true", help="embedded state store instead of redis-server")
    parser.add_argument("--out", default="bench/results/distributed")
    args = parser.parse_args()
    result = run(
        args.repetitions,
        args.max_new_tokens,
        args.policy,
        args.prompts,
        args.threads,
        not args.memory_store,
        args.dtype,
        [int(c) for c in args.concurrency.split(",") if c],
        progress=True,
        results_dir=Path(args.out).parent,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for arm, tps in result["tokens_per_second"].items():
        ratio = result["over_in_process"].get(arm, 1.0)
        differing = result["runs_differing_from_in_process"].get(arm, 0)
        split = ", ".join(f"{k} {v['p50']:.2f}" for k, v in result["round_ms"][arm].items())
        print(f"{arm:12s} {tps['median']:6.1f} tok/s ({ratio:.2f}x), runs differing {differing}; p50 ms: {split}")
    for c, ratio in result["concurrent_pipelined_over_unpipelined"].items():
        rates = result["concurrent_tokens_per_second"][c]
        print(
            f"{c} sessions: pipelined {rates['pipelined']['median']:.1f}, unpipelined "
            f"{rates['unpipelined']['median']:.1f} tok/s (pipelined/unpipelined {ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
