"""python -m loadtest: load a running controller (--target) or a LocalStack it starts (--local-stack), through
the gRPC SDK (--protocol grpc, the default) or the OpenAI-compatible HTTP API (--protocol http).

    python -m loadtest --target localhost:50051 --metrics-urls http://localhost:9100/metrics \\
        --concurrency 4 --requests 32 --max-new-tokens 64 --slo ttft=500,tpot=50
    python -m loadtest --protocol http --target https://eesd.example:8000 --auth-token-file token \\
        --tls-ca-file ca.pem --concurrency 8 --requests 64
    python -m loadtest --local-stack --rate 2 --duration 30
    python -m loadtest --local-stack --sweep --requests 12 --out loadtest/results   # concurrency x spec on/off

Every comma list (--concurrency, --rate, --speculation) is swept; the report (JSON + PNG) goes to --out.
"""

import argparse
import asyncio
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from loadtest.environment import load_average, machine, model_description, source_tree
from loadtest.openai_api import ServerUnusable
from loadtest.prompts import load_prompts
from loadtest.report import Slo, summarize, write_report
from loadtest.runner import PROTOCOLS, Connection, Load, run_load
from loadtest.scrape import scrape, speculation_stats
from serving.local_stack import add_stack_arguments, free_port, stack_from_args
from serving.security import Tokens

log = logging.getLogger("loadtest")
SWEEP_CONCURRENCY = "1,2,4,8"


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="controller HOST:PORT (gRPC); with --protocol http its API's URL or HOST:PORT")
    where.add_argument("--local-stack", action="store_true", help="start a LocalStack (loopback processes)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="the SDK (grpc) or /v1/completions (http)")
    p.add_argument("--model", help="http: the request's model (default: the one GET /v1/models lists)")
    c = p.add_argument_group("authentication and TLS (both protocols; as the services' and the SDK's settings)")
    c.add_argument("--auth-token", help="bearer token (a comma list: the first is sent)")
    c.add_argument("--auth-token-file", help="file of bearer tokens, one a line (the first is sent)")
    c.add_argument("--tls", action="store_true", help="TLS with the system's roots (implied by the options below)")
    c.add_argument("--tls-ca-file", help="CA certificate (PEM) to verify the server with")
    c.add_argument("--tls-cert-file", help="client certificate (PEM) for mutual TLS, with --tls-key-file")
    c.add_argument("--tls-key-file", help="client private key (PEM) for mutual TLS")
    c.add_argument("--tls-server-name", help="the name the server's certificate must carry, if not the target's host")
    p.add_argument("--metrics-urls", type=_list(str), default=[], help="services' /metrics URLs to scrape")
    p.add_argument("--concurrency", type=_list(int), help="closed loop: clients in flight (comma list sweeps)")
    p.add_argument("--rate", type=_list(float), help="open loop: Poisson requests/s (comma list sweeps)")
    p.add_argument("--sweep", action="store_true", help=f"--concurrency {SWEEP_CONCURRENCY} --speculation on,off")
    p.add_argument("--speculation", type=_list(str), default=None, help="on, off or on,off (default on)")
    p.add_argument("--requests", type=int, help="requests per run")
    p.add_argument("--duration", type=float, help="seconds per run (new requests stop; in-flight ones finish)")
    p.add_argument("--prompts", help="file: .jsonl ({'prompt': text | ids} or a string per line) or .txt lines")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--policy", default=None, help="draft policy when speculation is on (default: the server's)")
    p.add_argument("--k-max", type=int, default=None)
    p.add_argument("--stop-on-eos", action="store_true", help="default: generate exactly --max-new-tokens")
    p.add_argument("--slo", default="ttft=1000,tpot=100", help="goodput SLO in ms: ttft=..,tpot=..,e2e=..")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before the first run")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of one request, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="loadtest/results", help="report directory")
    p.add_argument("--name", default="loadtest", help="report file stem")
    g = p.add_argument_group("--local-stack")
    add_stack_arguments(g, ".cache/loadtest-stack-logs")
    args = p.parse_args(argv)
    if args.sweep:
        args.concurrency = args.concurrency or _list(int)(SWEEP_CONCURRENCY)
        args.speculation = args.speculation or ["on", "off"]
    if not args.concurrency and not args.rate:
        args.concurrency = [1]
    args.speculation = args.speculation or ["on"]
    if set(args.speculation) - {"on", "off"}:
        p.error("--speculation takes on, off or on,off")
    if args.requests is None and args.duration is None:
        p.error("give --requests, --duration or both")
    if args.model_dir and args.exit_layer is None:
        p.error("--exit-layer is required with --model-dir")
    secured = (args.auth_token, args.auth_token_file, args.tls, args.tls_ca_file, args.tls_cert_file)
    if args.local_stack and any(secured):
        p.error("--local-stack serves neither TLS nor tokens; give --target a stack that does")
    try:  # token files and TLS files read, and the SDK's checks made, for either protocol, before anything starts
        connection(args).tls_config()
    except (ValueError, OSError) as error:  # eesd.errors.InvalidArgument is a ValueError
        p.error(f"authentication or TLS settings: {error}")
    return args


def connection(args: argparse.Namespace) -> Connection:
    """How the runs reach the controller (--target, set by --local-stack once its stack listens)."""
    tokens = Tokens(args.auth_token or "", args.auth_token_file or "")  # the services' token lists and files
    return Connection(
        args.target or "",
        args.protocol,
        tokens.first() or None,
        args.tls,
        args.tls_ca_file,
        args.tls_cert_file,
        args.tls_key_file,
        args.tls_server_name,
        args.model,
    )


def loads(args: argparse.Namespace) -> list[Load]:
    base = Load(
        concurrency=1,
        requests=args.requests,
        duration_s=args.duration,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        k_max=args.k_max,
        stop_on_eos=args.stop_on_eos,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    shapes = [dict(concurrency=c) for c in args.concurrency or []] + [
        dict(concurrency=None, rate=r) for r in args.rate or []
    ]
    return [
        replace(base, **shape, policy="off" if spec == "off" else args.policy)
        for shape in shapes
        for spec in args.speculation
    ]


def start_stack(args: argparse.Namespace, stack: ExitStack):
    http_port = free_port() if args.protocol == "http" else 0
    local = stack_from_args(args, http_port=http_port)
    log.info("starting a LocalStack (%s, N=%d) ...", args.model_dir, args.exit_layer)
    stack.enter_context(local)
    args.target = f"http://127.0.0.1:{http_port}" if http_port else local.controller_address
    args.metrics_urls = args.metrics_urls or [n.metrics_url for n in local.nodes if n.metrics_port]
    return local


def served_model_names(samples) -> list[str]:
    """The `model_name` labels of the scraped vllm: metrics (what a --target stack says it serves)."""
    return sorted({dict(labels)["model_name"] for _, labels in samples.values if "model_name" in dict(labels)})


def environment(args: argparse.Namespace, argv: list[str], started: dict, served: list[str]) -> dict:
    """What the report ran on: command, commit and tree state, machine, model, stack, SLO, load average
    (before the stack started and after the last run), time."""
    if args.model_dir:
        model = model_description(args.model_dir, args.exit_layer, args.exit_head, args.dtype)
        if served:
            model["served_model_names"] = served
    else:  # --target without --model-dir: only what the metrics say
        model = {"name": ",".join(served), "served_model_names": served} if served else None
    return {
        "command": " ".join(["python -m loadtest", *_redacted(argv)]),
        **source_tree(),
        "model": model,
        "machine": started["machine"],
        "load_average": {"start": started["load_average"], "end": load_average()},
        "stack": {
            "local": args.local_stack,
            "target": args.target,
            "protocol": args.protocol,
            "tls": connection(args).secure,
            "auth": bool(args.auth_token or args.auth_token_file),
            "drafters": args.drafters if args.local_stack else None,
            "verifiers": args.verifiers if args.local_stack else None,
            "state_store": ("redis" if args.redis else "memory") if args.local_stack else None,
            "threads_per_process": args.threads if args.local_stack else None,
        },
        "slo_ms": asdict(Slo.parse(args.slo)),
        "time_start": started["time"],
        "time_end": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started["clock"], 1),
    }


def _redacted(argv: list[str]) -> list[str]:
    """The command line without the value of --auth-token: a report is shared, its token must not be."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else ("--auth-token=***" if arg.startswith("--auth-token=") else arg))
        hide = arg == "--auth-token"
    return out


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    machine_now = machine()
    started = {  # before the stack starts: the load average of the machine's other work
        "machine": {k: v for k, v in machine_now.items() if k != "load_average"},
        "load_average": machine_now["load_average"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clock": time.perf_counter(),
    }
    served: list[str] = []
    with ExitStack() as stack:
        if args.local_stack:
            start_stack(args, stack)
        prompts = load_prompts(args.prompts)
        slo = Slo.parse(args.slo)
        reach = connection(args)
        if args.warmup:
            warm = Load(concurrency=1, requests=args.warmup, max_new_tokens=8, timeout_s=args.timeout)
            asyncio.run(run_load(reach, prompts, warm))
        runs = []
        for load in loads(args):
            before = scrape(args.metrics_urls) if args.metrics_urls else None
            served = served or (served_model_names(before) if before is not None else [])
            load_before = load_average()
            records, wall_s = asyncio.run(run_load(reach, prompts, load))
            server = speculation_stats(scrape(args.metrics_urls) - before) if before is not None else None
            runs.append(summarize(load, records, wall_s, slo, server))
            r = runs[-1]
            r["load_average"] = {"start": load_before, "end": load_average()}
            log.info(
                "%-14s %3d ok %2d failed  %7.1f tok/s  TTFT p50 %7.1f ms  TPOT p50 %6.1f ms  goodput %.2f req/s"
                "  load %.2f",
                r["name"],
                r["requests"]["completed"],
                r["requests"]["failed"],
                r["output_token_throughput"],
                r["ttft_ms"]["p50"] or 0.0,
                r["tpot_ms"]["p50"] or 0.0,
                r["goodput"]["requests_per_s"],
                r["load_average"]["end"][0] if r["load_average"]["end"] else 0.0,
            )
        return {"environment": environment(args, argv, started, served), "runs": runs}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        report = run(args, argv)
    except ServerUnusable as error:
        sys.exit(f"loadtest: {error}")
    for path in write_report(report, Path(args.out), args.name):
        print(path)
    if any(r["requests"]["failed"] for r in report["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
