"""`make demo`: text prompts streamed through the distributed stack with the client SDK, with and without
speculation, and the speedup measured.

Serves serving.models.default_model(): the reference model once `make model` has built it, else the demo
model (built and distilled on the first run, a few minutes, then cached). Starts a local stack (redis-server,
controller, drafter, verifier: separate processes over gRPC) unless a controller already answers at
--controller. Each held-out prompt is decoded twice through that same stack, greedily, for the same number
of tokens: under the speculative policy and with speculation off, both streamed as they come, in alternating
order (so that neither always runs first); the speedup is the ratio of their tokens per second.
"""

import argparse
import logging
import os
import time

import grpc
from eesd_client import EesdClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eesd import hardware, threads
from eesd.corpus import spread
from serving.local_stack import LocalStack
from serving.models import ServedModel, default_model

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def controller_up(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Printer:
    """Prints streamed text as it comes; newlines past the second of a run show as a dim ↵ on one line (a
    toy model's greedy continuations often hold dozens of them)."""

    def __init__(self) -> None:
        self.newlines = 0

    def write(self, text: str) -> None:
        out = []
        for char in text:
            self.newlines = self.newlines + 1 if char == "\n" else 0
            out.append(f"{DIM}↵{RESET}" if self.newlines > 2 else char)
        print("".join(out), end="", flush=True)


def stream(client: EesdClient, prompt: str, label: str, policy: str, max_new_tokens: int) -> tuple:
    """Streams one greedy answer under a label; returns (result, seconds)."""
    print(f"{BOLD}[{label}]{RESET} ", end="", flush=True)
    printer = Printer()
    start = time.perf_counter()
    answer = client.generate(prompt, max_new_tokens=max_new_tokens, policy=policy, temperature=0.0)
    for chunk in answer:
        printer.write(chunk.text)
    result = answer.result()
    return result, time.perf_counter() - start


def run(client: EesdClient, model: ServedModel, prompts: list[str], policy: str, max_new_tokens: int) -> None:
    arms = {"spec": policy, "plain": "off"}
    labels = {"spec": f"speculative, {policy}", "plain": "plain, speculation off"}
    for arm in arms.values():  # warm-up: first-call paths of both arms, outside the measurement
        client.generate_text(prompts[0], max_new_tokens=8, policy=arm, temperature=0.0)
    tokens = {arm: 0 for arm in arms}
    seconds = {arm: 0.0 for arm in arms}
    rounds = same = 0
    for i, prompt in enumerate(prompts):
        lines = prompt.rstrip("\n").split("\n")
        print(f"\n{DIM}--- prompt {i + 1}/{len(prompts)} (last {min(6, len(lines))} of its {len(lines)} lines):")
        print("\n".join(lines[-6:]) + RESET)
        results = {}
        for arm in list(arms)[:: 1 if i % 2 == 0 else -1]:
            result, took = stream(client, prompt, labels[arm], arms[arm], max_new_tokens)
            results[arm] = (result, took)
            tokens[arm] += len(result.token_ids)
            seconds[arm] += took
            print(f"\n{DIM}    {len(result.token_ids)} tokens in {took:.2f} s{RESET}")
        (spec, spec_s), (plain, plain_s) = results["spec"], results["plain"]
        rounds += spec.stats.speculation.rounds
        same += spec.token_ids == plain.token_ids
        print(
            f"    {len(spec.token_ids) / spec_s:.1f} tok/s speculative (mean accepted tokens per round "
            f"{spec.stats.speculation.mean_accepted_tokens:.2f}) vs {len(plain.token_ids) / plain_s:.1f} tok/s "
            f"plain: {(len(spec.token_ids) / spec_s) / (len(plain.token_ids) / plain_s):.2f}x, "
            + ("the same tokens" if spec.token_ids == plain.token_ids else "DIFFERENT TOKENS")
        )
    rate = {arm: tokens[arm] / seconds[arm] for arm in arms}
    load = os.getloadavg()[0]
    print(
        f"\n{BOLD}== {len(prompts)} held-out prompts, greedy, up to {max_new_tokens} tokens each, one stack: "
        f"{rate['spec']:.1f} tok/s speculative ({policy}, exit layer N={model.exit_layer}, "
        f"{tokens['spec'] / rounds:.2f} tokens per round) vs {rate['plain']:.1f} tok/s plain: "
        f"speedup {rate['spec'] / rate['plain']:.2f}x{RESET}; {same}/{len(prompts)} prompts gave the same tokens "
        f"both ways (load average {load:.2f} on {os.cpu_count()} cores)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controller", default="127.0.0.1:50051", help="use a running stack (make run) if up")
    parser.add_argument("--policy", default="beta-ts")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the first run's build
    threads.for_training()  # this process only builds (its torch threads wait passively); the stack serves
    model = default_model()
    print(f"\n{BOLD}Model{RESET}: {model.description}.", flush=True)
    prompts = [model.prompts[i] for i in spread(len(model.prompts), args.prompts)]
    stack = None
    if not controller_up(args.controller):
        dtype = hardware.describe_auto() if model.dtype == "auto" else model.dtype
        print(f"starting a local stack on {model.model_dir} (N={model.exit_layer}; {dtype}) ...", flush=True)
        stack = LocalStack(
            model.model_dir,
            model.exit_layer,
            model.exit_head,
            model.dtype,
            redis=True,
            log_dir=".cache/stack-logs",
            threads=1,
        ).start()
        args.controller = stack.controller_address
    try:
        with EesdClient(args.controller) as client:
            run(client, model, prompts, args.policy, args.max_new_tokens)
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
