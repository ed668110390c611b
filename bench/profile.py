"""Where a decode step's time goes: wall time vs matmul/attention kernels of the lean stack (torch.profiler).

python -m bench.profile [--model DIR --exit-layer N [--exit-head DIR]] [--threads 1] [--rows 1,4,16]

Without --model: the served model (serving.models.default_model: the reference model once `make model`
built it) with its exit layer and head.

--rows: one pass feeds that many sessions at once (continuous batching), each at context 150; the line
gives the pass and its cost per session.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from eesd import hardware
from eesd.decoder_stack import Row
from eesd.drafter import Drafter
from eesd.verifier import Verifier
from serving.models import default_model

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def measure(stack, num_tokens: int, rows: int = 1, context: int = 150, calls: int = 50) -> dict:
    pool = stack.new_pool(rows * 512, max_sessions=rows)
    caches = [pool.open(f"session-{i}", 512) for i in range(rows)]
    for cache in caches:
        stack(list(range(1, context)), cache)
    step = list(range(5, 5 + num_tokens))

    def one_pass() -> None:
        stack.forward_batch([Row(step, cache) for cache in caches])
        for cache in caches:
            cache.crop(context - 1)

    for _ in range(20):  # warm-up
        one_pass()
    start = time.perf_counter()
    for _ in range(calls):
        one_pass()
    wall = (time.perf_counter() - start) / calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            one_pass()
    events = prof.key_averages()
    kernels = sum(e.self_cpu_time_total for e in events if e.key in KERNELS) / calls / 1e3
    return {"wall_ms": 1e3 * wall, "kernels_ms": kernels, "rest_ms": 1e3 * wall - kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the served model)")
    parser.add_argument("--exit-layer", type=int, help="N (default: the served model's; required with --model)")
    parser.add_argument("--exit-head", help="exit head (default: the served model's at its N, else untrained)")
    parser.add_argument("--dtype", default="auto", help=hardware.DTYPE_HELP)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1", help="sessions per pass, comma-separated (default 1)")
    args = parser.parse_args()
    if args.model is None:
        served = default_model()
        args.model = served.model_dir
        if args.exit_layer in (None, served.exit_layer):  # its head is for its own N only
            args.exit_layer, args.exit_head = served.exit_layer, args.exit_head or served.exit_head or None
    elif args.exit_layer is None:
        parser.error("--exit-layer is required with --model")
    torch.set_num_threads(args.threads)
    verifier = Verifier(args.model, dtype=args.dtype)
    drafter = Drafter(args.model, args.exit_layer, args.exit_head, dtype=args.dtype)
    for rows in (int(n) for n in args.rows.split(",")):
        for name, stack, tokens in (
            ("verify 1 token", verifier.stack, 1),
            ("verify 6 tokens", verifier.stack, 6),
            ("draft step", drafter.stack, 1),
        ):
            m = measure(stack, tokens, rows)
            print(
                f"{name:16s} x{rows:<3d} wall {m['wall_ms']:6.2f} ms ({m['wall_ms'] / rows:5.2f} per session)  "
                f"matmul+attention {m['kernels_ms']:6.2f} ms  rest {m['rest_ms']:6.2f} ms"
            )


if __name__ == "__main__":
    main()
