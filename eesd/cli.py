"""`eesd` command line. The `generate` contract is used from outside: keep its flags and JSON keys."""

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from eesd import fetch, hardware, threads
from eesd.errors import EesdError, InvalidArgument
from eesd.params import POLICY_NAMES, GenerationParams, PolicyParams, SamplingParams

MODEL_HELP = "checkpoint directory (Llama/Mistral/Qwen2), or a Hugging Face id org/name[@revision]"


def at_least(minimum: int):
    """An argparse type for a count that nothing behind the flag checks: a whole number >= minimum, else
    argparse's usage error naming the flag (a negative --repetitions or --num-prompts used to run as an empty
    or odd benchmark). Counts a config validates itself (DistillConfig's, the drafter's exit layer) stay
    plain ints, so that rule lives in one place."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise InvalidArgument("prompt_ids", f"expected comma-separated integers, got {text!r}") from exc


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None for id-only checkpoints (tiny test models)."""
    if not (Path(model_dir) / "tokenizer.json").is_file() and not (Path(model_dir) / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def eos_ids(model_dir: str) -> frozenset[int]:
    from transformers import GenerationConfig

    from eesd.checkpoint import load_config

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: fall back to the model config
        eos = load_config(model_dir).eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def _request_params(args: argparse.Namespace, line: dict | None = None) -> GenerationParams:
    """The command's params, with a prompts-file line's own fields (same names as the flags) on top."""
    line = line or {}
    known = {"prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed"}
    if unknown := set(line) - known:
        raise InvalidArgument("prompts_file", f"unknown fields {sorted(unknown)}; expected {sorted(known)}")
    get = lambda name: line.get(name, getattr(args, name))  # noqa: E731
    params = GenerationParams(
        max_new_tokens=get("max_new_tokens"),
        sampling=SamplingParams(get("temperature"), get("top_k"), get("top_p"), get("seed")),
        policy=PolicyParams(args.policy, args.k_max),
    )
    params.validate()
    return params


def _prompts_file(path: str, args: argparse.Namespace, tokenizer) -> list[tuple[list[int], GenerationParams]]:
    """JSONL, one request per line: {"prompt": text} or {"prompt_ids": [...]}, optional per-line params."""
    requests = []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if not isinstance(line, dict):
                raise ValueError("not a JSON object")
            if "prompt" in line:
                if tokenizer is None:
                    raise ValueError("the model has no tokenizer: give prompt_ids")
                ids = tokenizer(line["prompt"])["input_ids"]
            else:
                ids = [int(t) for t in line["prompt_ids"]]
            requests.append((ids, _request_params(args, line)))
        except (ValueError, KeyError, TypeError, InvalidArgument) as error:
            raise InvalidArgument("prompts_file", f"{path} line {number}: {error}") from error
    return requests


def _result_json(result, tokenizer, **extra) -> str:
    return json.dumps(
        {
            **extra,
            "token_ids": result.token_ids,
            "text": tokenizer.decode(result.token_ids) if tokenizer else "",
            "finish_reason": result.finish_reason,
            "seed": result.seed,
            "stats": result.stats.summary(),
        }
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from eesd.drafter import Drafter
    from eesd.engine import SpeculativeEngine
    from eesd.verifier import Verifier

    if args.max_new_tokens is None and args.prompts_file is None:
        raise InvalidArgument("max_new_tokens", "required unless every prompts-file line gives it")
    tokenizer = load_tokenizer(args.model)
    if args.prompts_file is not None:
        requests = _prompts_file(args.prompts_file, args, tokenizer)
    else:
        params = _request_params(args)
        if args.prompt is not None:
            if tokenizer is None:
                raise InvalidArgument("prompt", f"{args.model} has no tokenizer; pass --prompt-ids")
            requests = [(tokenizer(args.prompt)["input_ids"], params)]
        else:
            requests = [(parse_ids(args.prompt_ids), params)]
    verifier = Verifier(args.model, dtype=args.dtype, device=args.device)
    drafter = Drafter(args.model, args.exit_layer, args.exit_head, dtype=args.dtype, device=args.device)
    engine = SpeculativeEngine(drafter, verifier, eos_ids(args.model), max_batch=args.max_batch)
    if args.prompts_file is not None:
        return _generate_file(engine, requests, tokenizer, args.output)

    def stream(tokens: list[int]) -> None:
        if not args.json:
            print(
                tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)),
                end=" " if not tokenizer else "",
                flush=True,
            )

    result = engine.generate(*requests[0], on_tokens=stream)
    if args.json:
        print(_result_json(result, tokenizer))
    else:
        s = result.stats
        print(
            f"\n[{s.generated} tokens, {s.rounds} rounds, tau {s.mean_accepted_tokens:.2f}, "
            f"{s.tokens_per_second:.1f} tok/s, finish: {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _generate_file(engine, requests, tokenizer, output: str | None) -> int:
    """Offline batch generation: every request batched on the engine, one JSON line each, in input order."""
    start = time.perf_counter()
    results = engine.generate_batch([ids for ids, _ in requests], [params for _, params in requests])
    elapsed = time.perf_counter() - start
    lines = [_result_json(result, tokenizer, index=i) for i, result in enumerate(results)]
    if output:
        Path(output).write_text("".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    tokens = sum(len(r.token_ids) for r in results)
    print(
        f"[{len(results)} prompts, {tokens} tokens in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s, "
        f"batches of up to {engine.max_batch}]",
        file=sys.stderr,
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from eesd.distill import DistillConfig, distill

    cfg = DistillConfig(
        model_dir=args.model,
        exit_layer=args.exit_layer,
        out_dir=args.out,
        prompts=args.prompts,
        num_prompts=args.num_prompts,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        sampled_fraction=args.sampled_fraction,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    report = distill(cfg, resume=not args.no_resume, progress=not args.no_progress)
    summary = {k: report[k] for k in ("before", "after", "train_tokens", "generation_s", "training_s")}
    print(json.dumps(summary | {"exit_head": args.out}))
    return 0


def add_distill_parser(sub) -> None:
    dist = sub.add_parser("distill", help="train the exit layer by self-distillation from the frozen model")
    dist.add_argument("--model", required=True, help=MODEL_HELP)
    dist.add_argument("--exit-layer", type=int, required=True, help="N: the exit layer reads layer N-1's output")
    dist.add_argument("--out", required=True, help="exit-head directory to write (checkpoints under out/checkpoints)")
    dist.add_argument("--prompts", help="prompt corpus: text file, directory of text files, or .jsonl")
    dist.add_argument("--num-prompts", type=int, default=256)
    dist.add_argument("--prompt-len", type=int, default=32)
    dist.add_argument("--gen-len", type=int, default=96, help="tokens the target generates per prompt")
    dist.add_argument("--sampled-fraction", type=float, default=0.5, help="share of prompts continued by sampling")
    dist.add_argument("--steps", type=int, default=300)
    dist.add_argument("--batch-size", type=int, default=16)
    dist.add_argument("--lr", type=float, default=1e-3)
    dist.add_argument("--checkpoint-every", type=int, default=50)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--device", default="cpu", help=hardware.DEVICE_HELP)
    dist.add_argument("--dtype", default="auto", help=f"the target's dtype: {hardware.DTYPE_HELP}")
    dist.add_argument("--no-resume", action="store_true", help="ignore checkpoints and start over")
    dist.add_argument("--no-progress", action="store_true")
    dist.set_defaults(func=cmd_distill)


def bench_prompts(args: argparse.Namespace) -> dict:
    """The evaluation prompts and, with --tune-policies, the tuning prompts: another slice of --tune-prompts
    (default: the --prompts file) with no source file and no prompt in common with the evaluation's."""
    from bench.prompts import load_prompt_set, random_prompts
    from eesd.checkpoint import load_config

    def choose(path: str | None, count: int, seed: int, exclude=()):
        if path:
            return load_prompt_set(path, args.model, count, exclude)
        return random_prompts(load_config(args.model).vocab_size, count, seed, exclude)  # id-only checkpoints

    sets = {"evaluation": choose(args.prompts, args.num_prompts, args.seed)}
    if args.tune_policies:
        tune_file = args.tune_prompts or args.prompts
        sets["tuning"] = choose(tune_file, args.num_tune_prompts, args.seed + 1, [sets["evaluation"]])
    return sets


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.report import markdown
    from bench.suite import BenchConfig, run_suite

    prompts = bench_prompts(args)
    cfg = BenchConfig(
        model_dir=args.model,
        exit_layer=args.exit_layer,
        exit_head=args.exit_head,
        prompts=prompts["evaluation"].ids,
        name=args.name,
        command=shlex.join(["eesd", *sys.argv[1:]]),
        prompt_sources={kind: s.record() for kind, s in prompts.items()},
        tune_prompts=prompts["tuning"].ids if "tuning" in prompts else [],
        tune_policies=split_list(args.tune_policies),
        out_dir=args.out,
        max_new_tokens=args.max_new_tokens,
        repetitions=args.repetitions,
        temperatures=[float(t) for t in args.temperatures.split(",")],
        dtype=args.dtype,
        k_max=args.k_max,
        fixed_ks=[int(k) for k in split_list(args.fixed_ks)],
        policies=split_list(args.policies),
        include_hf=not args.no_hf,
        seed=args.seed,
        threads=args.threads,
        plots=not args.no_plots,
    )
    result = run_suite(cfg, progress=not args.quiet)
    print(markdown(result))
    return 0


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark EESD against HF generate / assisted generation / ours")
    bench.add_argument("--model", required=True, help=MODEL_HELP)
    bench.add_argument("--exit-layer", type=int, required=True)
    bench.add_argument("--exit-head", help="trained exit-head directory (default: untrained)")
    bench.add_argument("--prompts", help=".jsonl or .json prompts (default: random ids)")
    bench.add_argument("--num-prompts", type=at_least(1), default=8)
    bench.add_argument("--max-new-tokens", type=at_least(1), default=96)
    bench.add_argument("--repetitions", type=at_least(1), default=3)
    bench.add_argument("--temperatures", default="0,0.7", help="comma-separated; 0 is greedy")
    bench.add_argument("--dtype", default="auto", help=hardware.DTYPE_HELP)
    bench.add_argument("--k-max", type=int, default=8)
    bench.add_argument("--fixed-ks", default="1,2,3,4,5,6,7,8")
    bench.add_argument("--policies", default="heuristic,threshold,beta-ts,calibration-ts")
    bench.add_argument(
        "--tune-policies",
        default="",
        help="candidate option sets tuned on the tuning prompts, e.g. 'beta-ts[discount=0.8],calibration-ts"
        "[min_accept=0.25]'; the best of each policy joins the evaluation labelled tuned (default: no tuning)",
    )
    bench.add_argument(
        "--tune-prompts", help="tuning prompts (default: --prompts, other rows and source files than the evaluation's)"
    )
    bench.add_argument("--num-tune-prompts", type=at_least(0), default=4)
    bench.add_argument("--no-hf", action="store_true", help="skip HF generate and HF assisted generation")
    add_results_arguments(bench, "bench", "<name>.json and PNGs")
    bench.set_defaults(func=cmd_bench)


def add_results_arguments(parser: argparse.ArgumentParser, name: str, files: str) -> None:
    """What a measuring command (bench, sweep) shares: its seed, threads, where results go, how it reports."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--name", default=name, help=f"results are written to <out>/{files}")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Distills (or takes untrained) exit layers for a few N, measures each on held-out prompts, recommends N."""
    from bench.prompts import load_prompt_set, random_prompts
    from bench.report import sweep_markdown
    from bench.sweep import SweepConfig, default_exit_layers, run_sweep
    from eesd.checkpoint import load_config
    from eesd.reference_model import PROMPTS_FILE, TRAIN_PROMPTS_FILE

    config = load_config(args.model)
    exit_layers = [int(n) for n in split_list(args.exit_layers)] or default_exit_layers(config.num_hidden_layers)
    # A reference model ships held-out prompts and, apart, the training prompts distillation may use.
    held_out, train = Path(args.model) / PROMPTS_FILE, Path(args.model) / TRAIN_PROMPTS_FILE
    prompts_file = args.prompts or (str(held_out) if held_out.is_file() else None)
    if prompts_file:
        # The rows `eesd bench --num-prompts K` evaluates on stay out: N chosen on them would flatter them.
        k = args.skip_evaluation_prompts
        evaluation = [load_prompt_set(prompts_file, args.model, k)] if k else []
        prompts = load_prompt_set(prompts_file, args.model, args.num_prompts, evaluation)
    else:  # id-only checkpoints: random prompts, other draws than distillation's (eesd.distill.load_prompts)
        prompts = random_prompts(config.vocab_size, args.num_prompts, args.seed)
    cfg = SweepConfig(
        model_dir=args.model,
        exit_layers=exit_layers,
        prompts=prompts,
        distill_prompts=args.distill_prompts or (str(train) if train.is_file() else None),
        untrained=args.untrained,
        policy=args.policy,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        repetitions=args.repetitions,
        dtype=args.dtype,
        k_max=args.k_max,
        threads=args.threads,
        seed=args.seed,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        name=args.name,
        plots=not args.no_plots,
        command=shlex.join(["eesd", *sys.argv[1:]]),
        # Unset: SweepConfig's, which are the quick recipe's.
        **{k: v for k in ("distill_steps", "distill_num_prompts") if (v := getattr(args, k)) is not None},
    )
    print(sweep_markdown(run_sweep(cfg, progress=not args.quiet)))
    return 0


def add_sweep_parser(sub) -> None:
    sweep = sub.add_parser("sweep", help="choose the exit layer N: quick exit layers for a few N, measured")
    sweep.add_argument("--model", required=True)
    sweep.add_argument(
        "--exit-layers", default="", help="comma-separated N (default: 1, 2, 3, 4, 6, ... up to 40%% of the layers)"
    )
    sweep.add_argument("--untrained", action="store_true", help="untrained exit layers instead of quick distillation")
    sweep.add_argument(
        "--prompts",
        help="held-out prompts, .jsonl or .json (default: the model's heldout_prompts.jsonl, else random ids)",
    )
    sweep.add_argument(
        "--distill-prompts", help="distillation corpus (default: the model's train_prompts.jsonl, else random ids)"
    )
    sweep.add_argument("--distill-steps", type=int, help="default: the quick recipe's (eesd.presets), 100")
    sweep.add_argument("--distill-num-prompts", type=int, help="default: the quick recipe's (eesd.presets), 64")
    sweep.add_argument(
        "--cache-dir", default=".cache/sweep", help="distilled heads, one directory per model build, N and settings"
    )
    sweep.add_argument("--num-prompts", type=at_least(1), default=8)
    sweep.add_argument(
        "--skip-evaluation-prompts",
        type=at_least(0),
        default=0,
        metavar="K",
        help="leave out the prompts (and their source files) that eesd bench --num-prompts K evaluates on",
    )
    sweep.add_argument("--max-new-tokens", type=at_least(1), default=96)
    sweep.add_argument("--repetitions", type=at_least(1), default=3)
    sweep.add_argument("--policy", default="beta-ts", help="the draft policy every N is measured with")
    sweep.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sweep.add_argument("--dtype", default="auto", help=hardware.DTYPE_HELP)
    sweep.add_argument("--k-max", type=int, default=8)
    add_results_arguments(sweep, "sweep", "<name>.json and .png")
    sweep.set_defaults(func=cmd_sweep)


def cmd_model(args: argparse.Namespace) -> int:
    """Builds a preset's model (cached by its recipe stamp), then distills its exit head (cached): eesd.presets."""
    from eesd import presets

    preset = presets.PRESETS[args.preset]
    model_dir, head_dir = presets.ensure_model(
        preset,
        args.out,
        args.exit_layer,
        args.exit_head_out,
        build=not args.skip_build,
        force_distill=args.force,
        threads=args.threads,
        progress=not args.no_progress,
    )
    report = json.loads((head_dir / "distill.json").read_text())
    print(
        json.dumps(
            {
                "model": str(model_dir),
                "exit_head": str(head_dir),
                "exit_layer": report["config"]["exit_layer"],
                "before": report["before"],
                "after": report["after"],
            }
        )
    )
    return 0


def add_model_parser(sub) -> None:
    model = sub.add_parser("model", help="build the reference (or demo) model and distill its exit head (both cached)")
    model.add_argument(
        "--preset", default="reference", choices=("reference", "demo"), help="which recipe (eesd/presets.py)"
    )
    model.add_argument("--out", help="model directory (default: the preset's, .cache/reference-model or demo-model)")
    model.add_argument("--exit-layer", type=int, help="N (default: the preset's, 1)")
    model.add_argument("--exit-head-out", help="exit-head directory (default: <out>-exit-head-n<N>)")
    model.add_argument("--skip-build", action="store_true", help="only distill (the model is already built)")
    model.add_argument("--force", action="store_true", help="distill again even when the head is up to date")
    model.add_argument("--threads", type=at_least(1), default=2)
    model.add_argument("--no-progress", action="store_true")
    model.set_defaults(func=cmd_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eesd", description="Early-Exiting Speculative Decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate with the in-process engine")
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--exit-layer", type=int, required=True, help="N: the drafter runs layers 0..N-1")
    gen.add_argument("--exit-head", help="trained exit-head directory (default: untrained copy of the last layer)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    prompt.add_argument(
        "--prompts-file",
        help='JSONL of requests, batched: {"prompt": text} or {"prompt_ids": [...]}, optionally with '
        "max_new_tokens, temperature, top_p, top_k, seed; writes one JSON result per line",
    )
    gen.add_argument("--output", help="with --prompts-file: write the JSONL results here (default: stdout)")
    gen.add_argument("--device", default="cpu", help=hardware.DEVICE_HELP)
    gen.add_argument(
        "--max-batch", type=at_least(1), default=64, help="sessions generated at once (continuous batching)"
    )
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--policy", default="beta-ts", help=f"one of {', '.join(POLICY_NAMES)}")
    gen.add_argument("--k-max", type=int, default=8)
    gen.add_argument("--dtype", default="auto", help=hardware.DTYPE_HELP)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=cmd_generate)
    add_distill_parser(sub)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    add_model_parser(sub)
    fetch_parser = sub.add_parser("fetch", help="fetch a checkpoint from the Hugging Face hub or an http(s) archive")
    fetch.add_arguments(fetch_parser)
    fetch_parser.set_defaults(func=fetch.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("model", "distill", "bench", "sweep"):  # long work: progress as log lines off a terminal
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command in ("model", "distill"):
        threads.for_training()  # before torch loads: passive OpenMP waiting (eesd/threads.py)
    try:
        if getattr(args, "model", None):  # every command's --model: a directory or a Hugging Face id
            args.model = str(fetch.resolve_model(args.model))
        if getattr(args, "device", None) is not None:
            hardware.check_device(args.device)
        if getattr(args, "dtype", None) == "auto":
            print(f"eesd: {hardware.describe_auto(getattr(args, 'device', 'cpu'))}", file=sys.stderr)
        return args.func(args)
    except EesdError as exc:
        print(f"eesd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
