"""Distributed stack vs in-process engine at one session, and where a round's time goes.

Same model, prompts, policy and dtype; runs interleaved prompt by prompt (the machine is shared and
noisy, so only ratios within one run mean anything). Writes bench/results/distributed.json and .png.

    python -m bench.distributed [--repetitions 3] [--max-new-tokens 96] [--policy beta-ts]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from eesd_client import EesdClient

from bench.suite import machine
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams
from eesd.verifier import Verifier
from serving.local_stack import LocalStack
from serving.models import default_model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(repetitions: int, max_new_tokens: int, policy: str, prompts: int, threads: int, redis: bool) -> dict:
    torch.set_num_threads(threads)
    model = default_model()
    engine = SpeculativeEngine(
        Drafter(model.model_dir, model.exit_layer, model.exit_head or None, model.dtype),
        Verifier(model.model_dir, model.dtype),
    )
    prompt_list = model.prompts[:prompts]
    with (
        LocalStack(
            model.model_dir, model.exit_layer, model.exit_head, model.dtype, redis=redis, threads=threads
        ) as stack,
        EesdClient(stack.controller_address) as client,
    ):
        encode = (lambda p: p) if not isinstance(prompt_list[0], str) else None
        if encode is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
            encode = lambda p: tokenizer(p)["input_ids"]  # noqa: E731
        params = GenerationParams(max_new_tokens, policy=PolicyParams(policy))
        client.generate_text(encode(prompt_list[0]), max_new_tokens=8, policy=policy)  # warm-up both paths
        engine.generate(encode(prompt_list[0]), GenerationParams(8, policy=PolicyParams(policy)))
        rates = {"in_process": [], "distributed": []}
        rounds, equal = [], True
        for _ in range(repetitions):
            totals = {"in_process": [0, 0.0], "distributed": [0, 0.0]}
            for prompt in prompt_list:
                ids = encode(prompt)
                start = time.perf_counter()
                local = engine.generate(ids, params)
                totals["in_process"][0] += len(local.token_ids)
                totals["in_process"][1] += time.perf_counter() - start
                start = time.perf_counter()
                remote = client.generate_text(ids, max_new_tokens=max_new_tokens, policy=policy)
                totals["distributed"][0] += len(remote.token_ids)
                totals["distributed"][1] += time.perf_counter() - start
                equal &= list(remote.token_ids) == local.token_ids
                rounds += remote.rounds
            for key, (tokens, seconds) in totals.items():
                rates[key].append(tokens / seconds)
    split = {
        name: [getattr(r, f"{name}_ms") for r in rounds] for name in ("draft", "verify", "transport", "controller")
    }
    medians = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "machine": machine(),
        "model": str(model.model_dir),
        "exit_layer": model.exit_layer,
        "dtype": model.dtype,
        "policy": policy,
        "prompts": len(prompt_list),
        "max_new_tokens": max_new_tokens,
        "repetitions": repetitions,
        "state_store": "redis" if redis else "memory",
        "tokens_per_second": {key: {"median": medians[key], "runs": values} for key, values in rates.items()},
        "distributed_over_in_process": medians["distributed"] / medians["in_process"],
        "same_tokens": equal,
        "round_ms": {
            name: {"p50": percentile(v, 0.5), "p90": percentile(v, 0.9), "p99": percentile(v, 0.99)}
            for name, v in split.items()
        },
        "rounds": len(rounds),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["in_process", "distributed"]
    left.bar(names, [result["tokens_per_second"][n]["median"] for n in names], color=["#4c72b0", "#dd8452"])
    left.set_ylabel("tokens/s (median)")
    left.set_title(f"one session, {result['policy']}: {result['distributed_over_in_process']:.2f}x")
    parts = ["draft", "verify", "transport", "controller"]
    right.bar(parts, [result["round_ms"][p]["p50"] for p in parts], color="#55a868")
    right.set_ylabel("ms per round (p50)")
    right.set_title("where a distributed round's time goes")
    fig.suptitle(
        f"{result['model']} N={result['exit_layer']} {result['dtype']} — {result['machine']['cpu']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--policy", default="beta-ts")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: robust on a loaded machine)"
    )
    parser.add_argument("--memory-store", action="store_true", help="embedded state store instead of redis-server")
    parser.add_argument("--out", default="bench/results/distributed")
    args = parser.parse_args()
    result = run(args.repetitions, args.max_new_tokens, args.policy, args.prompts, args.threads, not args.memory_store)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    tps = result["tokens_per_second"]
    print(
        f"in-process {tps['in_process']['median']:.1f} tok/s, distributed {tps['distributed']['median']:.1f} tok/s "
        f"({result['distributed_over_in_process']:.2f}x), same tokens: {result['same_tokens']}"
    )
    print("per-round p50 ms: " + ", ".join(f"{k} {v['p50']:.2f}" for k, v in result["round_ms"].items()))


if __name__ == "__main__":
    main()
