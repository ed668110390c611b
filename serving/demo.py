"""`make demo`: prompts streamed through the distributed stack with the client SDK.

Starts a local stack (redis-server, controller, drafter, verifier) unless a controller already answers
at --controller, streams each prompt with live text under the speculative policy, then decodes the same
prompt with speculation off through the same stack, and prints tokens/s, tau and the speedup.
"""

import argparse
import time

import grpc
from eesd_client import EesdClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eesd import hardware
from serving.local_stack import LocalStack
from serving.models import default_model


def controller_up(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def run(client: EesdClient, prompts: list, policy: str, max_new_tokens: int) -> None:
    totals = {"spec": [0, 0.0, 0, 0], "off": [0, 0.0, 0, 0]}  # tokens, seconds, rounds
    for prompt in prompts:
        shown = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        print(f"\n\033[1m>>> {shown[-200:]}\033[0m", flush=True)
        start = time.perf_counter()
        stream = client.generate(prompt, max_new_tokens=max_new_tokens, policy=policy)
        for chunk in stream:
            print(
                chunk.text if chunk.text or isinstance(prompt, str) else " ".join(map(str, chunk.token_ids)) + " ",
                end="",
                flush=True,
            )
        spec = stream.result()
        spec_s = time.perf_counter() - start
        start = time.perf_counter()
        plain = client.generate_text(prompt, max_new_tokens=max_new_tokens, policy="off")
        plain_s = time.perf_counter() - start
        same = "same tokens" if plain.token_ids == spec.token_ids else "DIFFERENT TOKENS"
        n = len(spec.token_ids)
        print(
            f"\n    {n / spec_s:6.1f} tok/s with {policy} (tau {spec.stats.speculation.mean_accepted_tokens:.2f}) vs "
            f"{len(plain.token_ids) / plain_s:6.1f} tok/s plain: {plain_s / spec_s:.2f}x, {same}"
        )
        totals["spec"][0] += n
        totals["spec"][1] += spec_s
        totals["spec"][2] += spec.stats.speculation.rounds
        totals["off"][0] += len(plain.token_ids)
        totals["off"][1] += plain_s
    spec_rate, plain_rate = totals["spec"][0] / totals["spec"][1], totals["off"][0] / totals["off"][1]
    print(
        f"\n== {len(prompts)} prompts: {spec_rate:.1f} tok/s speculative ({policy}), {plain_rate:.1f} tok/s plain, "
        f"speedup {spec_rate / plain_rate:.2f}x, mean accepted tokens {totals['spec'][0] / totals['spec'][2]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controller", default="127.0.0.1:50051", help="use a running stack (make run) if up")
    parser.add_argument("--policy", default="beta-ts")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = default_model()
    prompts = model.prompts[: args.prompts]
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
            run(client, prompts, args.policy, args.max_new_tokens)
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
