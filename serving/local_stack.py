"""A whole EESD stack on one machine, as separate processes on loopback: redis-server (optional), the
controllers (one by default; several share the state store), drafters and verifiers. `make run` serves one
until Ctrl-C; tests and the demo drive it.

    python -m serving.local_stack [--model-dir DIR --exit-layer N] [--drafters 1] [--verifiers 1] [--redis]
        [--controllers 1]
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.models import default_model

ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()  # a port is handed out once per process, even if nothing bound it yet


def free_port() -> int:
    """A loopback port that is free now and was not handed out before in this process."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass(frozen=True)
class StackSecurity:
    """TLS and tokens of a local stack. With `cert_file` and `key_file` every service serves TLS with them
    and calls the others over TLS, verifying with `ca_file` the name `server_name` (empty: the address's
    host); `client_auth` asks every service for client certificates (the services present their own), and
    drafters and verifiers accept only those naming one of `node_client_names` when set.
    `internal_token`: what the controller and the drafters send to the nodes and the nodes require;
    `auth_token`: the clients' tokens at the controller (comma-separated)."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    server_name: str = ""
    client_auth: bool = False
    node_client_names: str = ""
    internal_token: str = ""
    auth_token: str = ""

    def args(self, role: str) -> list[str]:
        args = []
        if self.cert_file:
            args += ["--tls-cert-file", self.cert_file, "--tls-key-file", self.key_file, "--internal-tls", "true"]
        if self.ca_file:
            args += ["--tls-ca-file", self.ca_file]
        if self.server_name:
            args += ["--internal-server-name", self.server_name]
        if self.client_auth:
            args += ["--tls-client-auth", "true"]
        if self.node_client_names and role in ("drafter", "verifier"):
            args += ["--tls-client-names", self.node_client_names]
        if self.internal_token:
            args += ["--internal-token", self.internal_token]
        if role == "controller" and self.auth_token:
            args += ["--auth-token", self.auth_token]
        return args

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to one of the stack's services (its health checks need no token)."""
        if not self.cert_file:
            return grpc.insecure_channel(address)
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options)


def wait_serving(
    address: str, process: subprocess.Popen, timeout_s: float, log: Path, security: StackSecurity | None = None
) -> None:
    """Blocks until the standard health check answers SERVING; fails fast if the process died."""
    deadline = time.monotonic() + timeout_s
    with (security or StackSecurity()).channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{address} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout_s} s:\n{log.read_text()[-3000:]}")


@dataclass
class Node:
    role: str  # "controller", "drafter", "verifier" or "redis"
    port: int
    args: list[str]
    log: Path
    process: subprocess.Popen | None = None
    metrics_port: int = 0  # Prometheus /metrics (0: none, e.g. redis)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else ""


class LocalStack:
    def __init__(
        self,
        model_dir: str | Path,
        exit_layer: int,
        exit_head: str = "",
        dtype: str = "float32",
        drafters: int = 1,
        verifiers: int = 1,
        redis: bool = False,
        log_dir: str | Path | None = None,
        threads: int = 1,
        controller_args: tuple[str, ...] = (),
        controller_port: int = 0,
        drafter_args: tuple[str, ...] = (),
        controllers: int = 1,
        redis_args: tuple[str, ...] = (),
        store_port: int = 0,
        security: StackSecurity | None = None,
        http_port: int = 0,
    ):
        """`controllers` controllers share the state store (with memory:// each has its own); the first one
        listens on `controller_port` and logs to controller.log, the others to controller1.log, ...
        `redis_args` are appended to redis-server's flags (its files go to the log directory), e.g.
        ("--appendonly", "yes"); `store_port`, when set, is the port the controllers reach Redis on instead
        of Redis's own (a proxy in front of it). `security`: TLS and tokens (none by default). `http_port`: the
        first controller's OpenAI-compatible HTTP API (0: off)."""
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="eesd-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.security = security or StackSecurity()
        self.http_port = http_port  # the first controller's HTTP API (0: off)
        model = ["--model-dir", str(model_dir), "--dtype", dtype]
        self.nodes: list[Node] = []
        if redis:
            port = free_port()
            self.nodes.append(
                Node(
                    "redis",
                    port,
                    [
                        shutil.which("redis-server") or "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.log_dir),
                        *redis_args,
                    ],
                    self.log_dir / "redis.log",
                )
            )
        for i in range(verifiers):
            self._add_service("verifier", "verifier_service", f"verifier{i}", model)
        for i in range(drafters):
            self._add_service(
                "drafter",
                "drafter_service",
                f"drafter{i}",
                [
                    *model,
                    "--exit-layer",
                    str(exit_layer),
                    "--exit-head",
                    exit_head,
                    "--verifiers",
                    ",".join(n.address for n in self.by_role("verifier")),
                    *drafter_args,
                ],
            )
        redis_url = f"redis://127.0.0.1:{store_port or self.by_role('redis')[0].port}/0" if redis else "memory://"
        for i in range(controllers):
            self._add_service(
                "controller",
                "controller",
                f"controller{i or ''}",
                [
                    "--redis-url",
                    redis_url,
                    "--drafters",
                    ",".join(n.address for n in self.by_role("drafter")),
                    "--verifiers",
                    ",".join(n.address for n in self.by_role("verifier")),
                    "--model-dir",
                    str(model_dir),
                    "--node-down-s",
                    "1",
                    *(["--http-port", str(http_port)] if http_port and i == 0 else []),
                    *controller_args,
                ],
                controller_port if i == 0 else 0,
            )

    def _add_service(self, role: str, module: str, name: str, args: list[str], port: int = 0) -> None:
        """One of the stack's Python services on loopback, with its own log and /metrics port."""
        port = port or free_port()
        command = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
        command += self.security.args(role)
        self.nodes.append(Node(role, port, command, self.log_dir / f"{name}.log", metrics_port=free_port()))

    def by_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.role == role]

    @property
    def controller_address(self) -> str:
        """The first controller's address."""
        return self.by_role("controller")[0].address

    @property
    def controller_addresses(self) -> list[str]:
        return [n.address for n in self.by_role("controller")]

    @property
    def controller_target(self) -> str:
        """A gRPC target naming every controller (`ipv4:host:port,host:port`); a client balances over them
        with the round_robin load-balancing policy and moves to another when one goes away."""
        return "ipv4:" + ",".join(self.controller_addresses)

    def _spawn(self, node: Node) -> None:
        if node.metrics_port and "--metrics-port" not in node.args:
            node.args += ["--metrics-port", str(node.metrics_port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        node.process = subprocess.Popen(
            node.args, stdout=node.log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )

    def _wait(self, node: Node, timeout_s: float) -> None:
        if node.role == "redis":
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", node.port)) == 0:
                        return
                time.sleep(0.05)
            raise TimeoutError(f"redis-server did not listen on {node.port}")
        wait_serving(node.address, node.process, timeout_s, node.log, self.security)

    def start(self, timeout_s: float = 180.0) -> "LocalStack":
        """Starts every process (model nodes in parallel), then waits for all to be SERVING."""
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._wait(node, timeout_s)
        return self

    def stop_node(self, node: Node, sig: int = signal.SIGTERM) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def start_node(self, node: Node, timeout_s: float = 180.0) -> None:
        """Starts a stopped node again on its port and waits until it serves."""
        self._spawn(node)
        self._wait(node, timeout_s)

    def restart_node(self, node: Node, timeout_s: float = 180.0) -> None:
        """Kills a node (its KV caches die with it) and starts it again on the same port."""
        self.stop_node(node, signal.SIGKILL)
        self.start_node(node, timeout_s)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_stack_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, log_dir: str) -> None:
    """The flags that describe a local stack (shared by `make run` and the load generator)."""
    parser.add_argument("--model-dir", help="default: the reference model once built (make model), else the demo model")
    parser.add_argument("--exit-layer", type=int)
    parser.add_argument("--exit-head", default="")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--drafters", type=int, default=1)
    parser.add_argument("--verifiers", type=int, default=1)
    parser.add_argument("--redis", action="store_true", help="run redis-server as the state store")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    parser.add_argument("--log-dir", default=log_dir, help="the stack's process logs")


def stack_from_args(
    args: argparse.Namespace,
    controller_port: int = 0,
    controllers: int = 1,
    http_port: int = 0,
    model_dtype: bool = True,
) -> LocalStack:
    """The stack the flags describe; without --model-dir, the default served model (serving.models), in its
    own dtype unless `model_dtype` is False (then --dtype)."""
    if args.model_dir is None:
        model = default_model()
        args.model_dir, args.exit_layer, args.exit_head = model.model_dir, model.exit_layer, model.exit_head
        args.dtype = model.dtype if model_dtype else args.dtype
    elif args.exit_layer is None:
        raise SystemExit("--exit-layer is required with --model-dir")
    return LocalStack(
        args.model_dir,
        args.exit_layer,
        args.exit_head,
        args.dtype,
        args.drafters,
        args.verifiers,
        args.redis,
        args.log_dir,
        args.threads,
        controller_port=controller_port,
        controllers=controllers,
        http_port=http_port,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(parser, ".cache/stack-logs")
    parser.add_argument("--controller-port", type=int, default=50051, help="the first controller's port")
    parser.add_argument("--controllers", type=int, default=1, help="controllers sharing the state store (--redis)")
    parser.add_argument(
        "--http-port", type=int, default=8000, help="the first controller's OpenAI-compatible HTTP API (0: off)"
    )
    args = parser.parse_args()
    stack = stack_from_args(args, args.controller_port, args.controllers, args.http_port)
    stack.start()
    for node in stack.nodes:
        metrics = f"  metrics {node.metrics_url}" if node.metrics_port else ""
        print(f"{node.role:10s} {node.address}  (log {node.log}){metrics}", flush=True)
    print(f"controller ready at {', '.join(stack.controller_addresses)}; Ctrl-C stops the stack", flush=True)
    if args.http_port:
        print(f"OpenAI-compatible API at http://127.0.0.1:{args.http_port}/v1", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping and all(n.process.poll() is None for n in stack.nodes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
