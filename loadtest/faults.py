"""python -m loadtest.faults: fault-injection trials under running sessions (issue #13), with a JSON report.

    python -m loadtest.faults --out loadtest/results/faults.json                # every fault, default counts
    python -m loadtest.faults --faults controller-kill=5,redis-pause=2 --hang-s 10 --redis-down-s 3

The stack (serving.local_stack, loopback processes): two controllers sharing one redis-server (append-only
file on, `appendfsync everysec`; the controllers reach it through a TCP proxy run here, so that it can be
cut), two drafters and two verifiers. The client is the SDK (EesdClient, its default retry policy) pointed
at both controllers (an `ipv4:` target with round_robin balancing); the sessions are greedy and generate
exactly --max-new-tokens tokens each.

A trial starts --sessions sessions at once and, at a random moment while they stream (seeded by (seed,
fault, trial)), injects its fault into a process that serves some of them; it heals the fault as the fault
says, waits for every stream, compares each client's output with the model's own greedy decoding
(transformers, float32) and the store's record of the session with what its client got, and waits until
every process serves again. The faults:

    controller-kill, drafter-kill, verifier-kill   kill -9, started again at once on the same port
    drafter-hang, verifier-hang                    SIGSTOP for --hang-s, then SIGCONT
    controller-hang                                SIGSTOP for --controller-hang-s, then SIGCONT (longer than
                                                   the SDK's keepalive takes to give up on the connection)
    redis-kill-empty                               kill -9, started again without its data (no persistence)
    redis-kill-aof                                 kill -9, started again from its append-only file
    redis-pause                                    SIGSTOP for --redis-down-s, then SIGCONT
    redis-unreachable                              its connections cut and new ones refused for --redis-down-s

Counted per fault: outputs identical to the reference, client-visible errors, duplicated, extra, missing and
wrong tokens (each output aligned with the reference), stored records that differ from what the client got,
resumes, process deaths, what the controllers logged (sessions resumed, moved off a node, nodes found lost,
sessions written back into Redis), and the extra time of resumed requests (and of every request) over the
median session of the uninterrupted baseline trials. A failed session's id, error and log lines go to the
report.
"""

import argparse
import contextlib
import difflib
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eesd_client import ChannelOptions, EesdClient, SessionState
from eesd_client.errors import EesdError, NotFoundError

from loadtest.hostile import _json_default, commit, greedy_reference, machine
from loadtest.scrape import scrape
from serving.local_stack import LocalStack, Node, free_port

log = logging.getLogger("loadtest.faults")

# What the controllers' logs say happened during a trial (counted lines).
LOG_EVENTS = {
    "resumed": ": resumed at round",  # a session taken up by a resuming client
    "node_replaced": " unavailable (",  # a session moved off a drafter or verifier
    "node_lost": "has not answered SERVING",  # a hung node found lost by the health probes
    "written_back": "the state store had lost it",  # a session written back into a Redis that lost it
}


@dataclass(frozen=True)
class Fault:
    name: str
    role: str
    action: str  # kill, hang, kill-empty, kill-aof, pause, unreachable
    what: str


FAULTS = {
    f.name: f
    for f in (
        Fault("controller-kill", "controller", "kill", "kill -9 of a controller serving sessions, started again"),
        Fault("drafter-kill", "drafter", "kill", "kill -9 of a drafter serving sessions, started again"),
        Fault("verifier-kill", "verifier", "kill", "kill -9 of a verifier serving sessions, started again"),
        Fault(
            "controller-hang", "controller", "hang", "SIGSTOP of a controller serving sessions for controller_hang_s"
        ),
        Fault("drafter-hang", "drafter", "hang", "SIGSTOP of a drafter serving sessions for hang_s"),
        Fault("verifier-hang", "verifier", "hang", "SIGSTOP of a verifier serving sessions for hang_s"),
        Fault("redis-kill-empty", "redis", "kill-empty", "kill -9 of Redis, started again without its data"),
        Fault("redis-kill-aof", "redis", "kill-aof", "kill -9 of Redis, started again from its append-only file"),
        Fault("redis-pause", "redis", "pause", "SIGSTOP of Redis for redis_down_s"),
        Fault("redis-unreachable", "redis", "unreachable", "Redis connections cut, new ones refused, redis_down_s"),
    )
}
# Trials per fault of the full run: the 100 per process kill; hangs cost their whole duration.
DEFAULT_TRIALS = {
    "controller-kill": 100,
    "drafter-kill": 100,
    "verifier-kill": 100,
    "controller-hang": 2,
    "drafter-hang": 3,
    "verifier-hang": 3,
    "redis-kill-empty": 10,
    "redis-kill-aof": 10,
    "redis-pause": 5,
    "redis-unreachable": 5,
}
# The client balances its calls over every controller the target names and leaves one that went away.
CLIENT_OPTIONS = ChannelOptions(extra=(("grpc.lb_policy_name", "round_robin"),))


# -- Redis behind a proxy that can be cut --------------------------------------------------------------------


class TcpProxy:
    """Forwards loopback TCP connections from `port` to `upstream_port`. cut() closes every connection and
    the listening socket, so the upstream is unreachable (connection refused) until restore()."""

    def __init__(self, port: int, upstream_port: int):
        self.port, self.upstream_port = port, upstream_port
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener, self._stop = listener, threading.Event()
        threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2.0)
            except OSError:  # Redis is down: so is this connection
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source, sink)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def cut(self) -> None:
        """Refuses new connections and closes the open ones."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):  # stops listening at once (close waits for the accept thread)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets = list(self._sockets)
        self._close(*sockets)

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()


# -- the stack --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fault_stack(
    model_dir: str | Path,
    exit_layer: int,
    exit_head: str = "",
    dtype: str = "float32",
    log_dir: str | Path | None = None,
    controllers: int = 2,
    drafters: int = 2,
    verifiers: int = 2,
    threads: int = 1,
    controller_args: tuple[str, ...] = (),
) -> Iterator[tuple[LocalStack, TcpProxy]]:
    """A started LocalStack with Redis (AOF, everysec) behind a TcpProxy; stopped on exit."""
    proxy_port = free_port()
    stack = LocalStack(
        model_dir,
        exit_layer,
        exit_head,
        dtype,
        drafters,
        verifiers,
        redis=True,
        log_dir=log_dir,
        threads=threads,
        controller_args=controller_args,
        controllers=controllers,
        redis_args=("--appendonly", "yes", "--appendfsync", "everysec"),
        store_port=proxy_port,
    )
    shutil.rmtree(stack.log_dir / "appendonlydir", ignore_errors=True)  # a previous run's data
    proxy = TcpProxy(proxy_port, stack.by_role("redis")[0].port).start()
    try:
        stack.start()
        yield stack, proxy
    finally:
        for node in stack.nodes:  # a stopped process cannot drain: run it again, then SIGTERM to all at once
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
                node.process.send_signal(signal.SIGTERM)
        stack.stop()
        proxy.close()


# -- one session ------------------------------------------------------------------------------------------------


@dataclass
class SessionOutcome:
    session_id: str
    prompt: int  # index into the prompt pool
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    resumes: int = 0
    attempts: int = 0
    seconds: float = 0.0
    max_gap_s: float = 0.0  # longest wait for a chunk (the first one included)
    result_matches: bool = True  # result().token_ids == the chunks' tokens
    # The fault hit it: it was on the victim node, or (a controller) had to call again, or (Redis) streaming.
    hit: bool = False
    # Filled in by the checks:
    identical: bool = False
    duplicated: int = 0
    extra: int = 0
    missing: int = 0
    wrong: int = 0
    store: str = ""  # "" when the stored record is exactly the finished session the client got, else why not


def stream_session(
    client: EesdClient, session_id: str, prompt_index: int, prompt: Sequence[int], max_new_tokens: int
) -> SessionOutcome:
    out = SessionOutcome(session_id, prompt_index)
    start = last = time.monotonic()
    stream = client.generate(
        list(prompt), max_new_tokens=max_new_tokens, temperature=0.0, stop_on_eos=False, session_id=session_id
    )
    try:
        for chunk in stream:
            now = time.monotonic()
            out.max_gap_s, last = max(out.max_gap_s, now - last), now
            out.tokens += chunk.token_ids
        out.result_matches = list(stream.result().token_ids) == out.tokens
    except EesdError as error:
        out.error = str(error)
    except Exception as error:  # noqa: BLE001 - anything else the SDK lets through is a client-visible error too
        out.error = f"{type(error).__name__}: {error}"
    out.seconds = time.monotonic() - start
    out.resumes, out.attempts = stream.resumes, stream.attempts
    return out


def running_calls(metrics_url: str) -> int:
    """Generate calls a controller runs now: its num_requests_running gauge, whatever its metric prefix."""
    values = scrape([metrics_url]).values
    return int(sum(v for (name, _), v in values.items() if name.rpartition(":")[2] == "num_requests_running"))


def align(got: Sequence[int], expected: Sequence[int]) -> dict[str, int]:
    """How `got` differs from `expected`: tokens repeated right after themselves (duplicated), other tokens
    too many (extra), tokens left out (missing) and tokens in the place of others (wrong)."""
    counts = {"duplicated": 0, "extra": 0, "missing": 0, "wrong": 0}
    matcher = difflib.SequenceMatcher(a=list(expected), b=list(got), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "insert":  # a duplicate repeats the tokens next to it (the alignment may put it either side)
            n, segment = j2 - j1, list(got[j1:j2])
            repeated = (j1 >= n and list(got[j1 - n : j1]) == segment) or list(got[j2 : j2 + n]) == segment
            counts["duplicated" if repeated else "extra"] += n
        elif tag == "delete":
            counts["missing"] += i2 - i1
        elif tag == "replace":
            common = min(i2 - i1, j2 - j1)
            counts["wrong"] += common
            counts["missing"] += i2 - i1 - common
            counts["extra"] += j2 - j1 - common
    return counts


def percentiles(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "max": round(ordered[-1], 3),
    }


# -- trials -----------------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    fault: str
    trial: int
    victim: str = ""
    at_s: float = 0.0  # when the fault hit, seconds after the sessions started
    hit: int = 0  # sessions the victim served then (all of them for Redis)
    heal_s: float = 0.0  # how long the fault lasted (a restart until SERVING, a hang, an outage)
    seconds: float = 0.0
    deaths: list[str] = field(default_factory=list)  # processes found dead that the trial did not kill
    sessions: list[SessionOutcome] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # LOG_EVENTS counted in the controllers' logs


class FaultBench:
    def __init__(
        self,
        stack: LocalStack,
        proxy: TcpProxy | None,
        prompts: Sequence[Sequence[int]],
        reference: Callable[[Sequence[int], int], Sequence[int]],
        sessions: int = 4,
        max_new_tokens: int = 160,
        hang_s: float = 60.0,
        redis_down_s: float = 10.0,
        seed: int = 0,
        timeout_s: float = 300.0,
        controller_hang_s: float | None = None,
    ):
        self.stack, self.proxy, self.prompts = stack, proxy, [list(p) for p in prompts]
        self.sessions, self.max_new_tokens = sessions, max_new_tokens
        self.hang_s, self.redis_down_s, self.seed, self.timeout_s = hang_s, redis_down_s, seed, timeout_s
        self.controller_hang_s = hang_s if controller_hang_s is None else controller_hang_s
        self.expected = [list(reference(p, max_new_tokens)) for p in self.prompts]
        self.baseline_s: float | None = None

    def client(self) -> EesdClient:
        return EesdClient(self.stack.controller_target, timeout=self.timeout_s, channel_options=CLIENT_OPTIONS)

    # The fault's victim: one process that serves some of the running sessions, chosen at random; with the
    # number of sessions it serves, and which ones where the store says (a drafter's, a verifier's).
    def _victim(
        self, role: str, client: EesdClient, session_ids: list[str], rng: random.Random
    ) -> tuple[Node, int, set[str]]:
        nodes = self.stack.by_role(role)
        if role == "redis":
            return nodes[0], 0, set()
        serving: dict[str, int] = {}
        on: dict[str, set[str]] = {}
        if role == "controller":
            for node in nodes:
                with contextlib.suppress(OSError):
                    serving[node.address] = running_calls(node.metrics_url)
        else:
            for session_id in session_ids:
                with contextlib.suppress(EesdError):
                    info = client.get_session(session_id, timeout=5)
                    if info.state == SessionState.ACTIVE:
                        address = getattr(info, f"{role}_id")
                        serving[address] = serving.get(address, 0) + 1
                        on.setdefault(address, set()).add(session_id)
        busy = [n for n in nodes if serving.get(n.address, 0) > 0]
        victim = rng.choice(busy or nodes)
        return victim, serving.get(victim.address, 0), on.get(victim.address, set())

    def _inject(self, fault: Fault, victim: Node) -> None:
        """The fault and its healing; returns once the victim serves again."""
        stack = self.stack
        if fault.action == "kill":
            stack.stop_node(victim, signal.SIGKILL)
            stack.start_node(victim)
        elif fault.action in ("hang", "pause"):
            victim.process.send_signal(signal.SIGSTOP)
            try:
                time.sleep(self.stopped_s(fault))
            finally:
                victim.process.send_signal(signal.SIGCONT)
        elif fault.action in ("kill-empty", "kill-aof"):
            stack.stop_node(victim, signal.SIGKILL)
            if fault.action == "kill-empty":
                shutil.rmtree(stack.log_dir / "appendonlydir", ignore_errors=True)
            stack.start_node(victim)
        elif fault.action == "unreachable":
            assert self.proxy is not None, "redis-unreachable needs the stack's Redis behind a TcpProxy"
            self.proxy.cut()
            try:
                time.sleep(self.redis_down_s)
            finally:
                self.proxy.restore()
        else:
            raise ValueError(f"unknown fault action {fault.action!r}")

    def stopped_s(self, fault: Fault) -> float:
        """How long a hang, pause or outage of `fault` lasts."""
        if fault.action == "hang":
            return self.controller_hang_s if fault.role == "controller" else self.hang_s
        return self.redis_down_s

    def trial(self, fault: Fault | None, index: int) -> TrialRecord:
        name = fault.name if fault else "none"
        rng = random.Random(f"{self.seed}:{name}:{index}")
        record = TrialRecord(name, index)
        picks = [(index * self.sessions + i) % len(self.prompts) for i in range(self.sessions)]
        ids = [f"fault-{name}-{index}-{i}-{rng.getrandbits(32):08x}" for i in range(self.sessions)]
        marks = {n.log: n.log.stat().st_size if n.log.is_file() else 0 for n in self.stack.by_role("controller")}
        with self.client() as client, ThreadPoolExecutor(self.sessions) as pool:
            with contextlib.suppress(EesdError):  # connects the channel to every controller before the trial
                client.get_session("fault-warmup", timeout=10)
            time.sleep(0.3)
            start = time.monotonic()
            futures = [
                pool.submit(stream_session, client, ids[i], p, self.prompts[p], self.max_new_tokens)
                for i, p in enumerate(picks)
            ]
            if fault is not None:
                typical = self.baseline_s or 2.0
                time.sleep(rng.uniform(0.1, 0.7) * typical)
                victim, record.hit, hit = self._victim(fault.role, client, ids, rng)
                if fault.role == "redis":  # every session still streaming
                    hit = {ids[i] for i, f in enumerate(futures) if not f.done()}
                    record.hit = len(hit)
                record.victim, record.at_s = f"{victim.role} {victim.address}", round(time.monotonic() - start, 3)
                healing = time.monotonic()
                self._inject(fault, victim)
                record.heal_s = round(time.monotonic() - healing, 3)
            record.sessions = [f.result(timeout=self.timeout_s + 60) for f in futures]
            record.seconds = round(time.monotonic() - start, 3)
            for outcome in record.sessions if fault is not None else ():
                # A controller's sessions are known by their second call (a resume, or a retry before the
                # first chunk); the other faults' from the store or the streams at the fault.
                outcome.hit = outcome.attempts > 1 if fault.role == "controller" else outcome.session_id in hit
            # A Redis started again without its data has lost the records of the sessions that had ended
            # before it: the controllers write back only the sessions they still drive.
            wiped = fault is not None and fault.action == "kill-empty"
            for outcome in record.sessions:
                self._check(client, outcome, record_may_be_gone=wiped and not outcome.hit)
        record.deaths = self._settle()
        record.events = count_events(marks)
        return record

    def _check(self, client: EesdClient, outcome: SessionOutcome, record_may_be_gone: bool = False) -> None:
        expected = self.expected[outcome.prompt]
        # A stream that failed is compared up to where it stopped: the rest is its error, not a gap.
        reference = expected[: len(outcome.tokens)] if outcome.error else expected
        outcome.identical = not outcome.error and outcome.tokens == expected and outcome.result_matches
        for key, value in align(outcome.tokens, reference).items():
            setattr(outcome, key, value)
        if outcome.error:
            outcome.store = "not checked: the stream failed"
            return
        try:
            info = client.get_session(outcome.session_id, include_token_ids=True, timeout=60)
        except NotFoundError as error:
            if not record_may_be_gone:
                outcome.store = f"GetSession: {error}"
            return
        except EesdError as error:
            outcome.store = f"GetSession: {error}"
            return
        prompt = self.prompts[outcome.prompt]
        if info.state != SessionState.FINISHED:
            outcome.store = f"state {info.state.name}"
        elif list(info.committed_token_ids) != prompt + outcome.tokens:
            stored = list(info.committed_token_ids[len(prompt) :])
            outcome.store = f"{len(stored)} tokens stored, {len(outcome.tokens)} received"

    def _settle(self, timeout_s: float = 180.0) -> list[str]:
        """Waits until every process serves again; one found dead is reported and started again."""
        deaths = []
        for node in self.stack.nodes:
            if node.process is None or node.process.poll() is not None:
                deaths.append(f"{node.role} {node.address}")
                log.error("%s %s died (log %s)", node.role, node.address, node.log)
                self.stack.start_node(node, timeout_s)
            else:
                self.stack._wait(node, timeout_s)
        return deaths

    def baseline(self, trials: int) -> list[TrialRecord]:
        records = [self.trial(None, i) for i in range(trials)]
        self.baseline_s = statistics.median(s.seconds for r in records for s in r.sessions)
        return records


def count_events(marks: dict[Path, int]) -> dict[str, int]:
    """LOG_EVENTS in what each log (path -> size before) has written since."""
    counts = dict.fromkeys(LOG_EVENTS, 0)
    for path, offset in marks.items():
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        for name, needle in LOG_EVENTS.items():
            counts[name] += text.count(needle)
    return counts


# -- the report -------------------------------------------------------------------------------------------------


def extra_in_trial(records: Sequence[TrialRecord]) -> list[float]:
    """Each hit session's time over the median of the sessions the fault missed in the same trial (the load
    of the moment, a restart's CPU included, is then common to both)."""
    out = []
    for r in records:
        missed = [s.seconds for s in r.sessions if not s.hit]
        if missed:
            out += [s.seconds - statistics.median(missed) for s in r.sessions if s.hit]
    return out


def summarize(records: Sequence[TrialRecord], baseline_s: float | None, fault: Fault | None = None) -> dict:
    sessions = [s for r in records for s in r.sessions]
    failed = [s for s in sessions if not s.identical or s.store]
    extra = [s.seconds - baseline_s for s in sessions] if baseline_s else []
    resumed = [s.seconds - baseline_s for s in sessions if s.resumes] if baseline_s else []
    hit = [s for s in sessions if s.hit]
    return {
        "what": fault.what if fault else "no fault",
        "trials": len(records),
        "sessions": len(sessions),
        "sessions_hit": sum(r.hit for r in records),
        "identical": sum(s.identical for s in sessions),
        "failed_sessions": len(failed),
        "client_errors": sum(bool(s.error) for s in sessions),
        "duplicated_tokens": sum(s.duplicated for s in sessions),
        "extra_tokens": sum(s.extra for s in sessions),
        "missing_tokens": sum(s.missing for s in sessions),
        "wrong_tokens": sum(s.wrong for s in sessions),
        "store_mismatches": sum(bool(s.store) and not s.error for s in sessions),
        "resumes": sum(s.resumes for s in sessions),
        "resumed_sessions": sum(bool(s.resumes) for s in sessions),
        # A call again before the first chunk arrived: a retry, with the session's id (not a resume).
        "retries_before_first_chunk": sum(s.attempts - 1 - s.resumes for s in sessions),
        "process_deaths": sum(len(r.deaths) for r in records),
        "controller_log_events": {name: sum(r.events.get(name, 0) for r in records) for name in LOG_EVENTS},
        # Over the median session of the uninterrupted baseline trials:
        "extra_latency_resumed_s": percentiles(resumed),
        "extra_latency_hit_s": percentiles([s.seconds - baseline_s for s in hit] if baseline_s else []),
        "extra_latency_missed_s": percentiles(
            [s.seconds - baseline_s for s in sessions if not s.hit] if baseline_s else []
        ),
        "extra_latency_all_s": percentiles(extra),
        # Over the sessions of the same trial that the fault missed:
        "extra_latency_hit_vs_missed_s": percentiles(extra_in_trial(records)),
        "max_chunk_gap_s": percentiles([s.max_gap_s for s in sessions]),
        "max_chunk_gap_hit_s": percentiles([s.max_gap_s for s in hit]),
        "session_s": percentiles([s.seconds for s in sessions]),
        "fault_at_s": percentiles([r.at_s for r in records]) if fault else None,
        "fault_lasted_s": percentiles([r.heal_s for r in records]) if fault else None,
        "trial_list": [
            {"trial": r.trial, "victim": r.victim, "at_s": r.at_s, "hit": r.hit, "lasted_s": r.heal_s}
            | {"s": r.seconds, "resumes": sum(s.resumes for s in r.sessions)}
            | {"failed": sum(1 for s in r.sessions if not s.identical or s.store), "deaths": r.deaths}
            # per session: seconds, resumes, hit (1/0), longest wait for a chunk
            | {"sessions": [[round(s.seconds, 2), s.resumes, int(s.hit), round(s.max_gap_s, 2)] for s in r.sessions]}
            for r in records
        ]
        if fault
        else None,
        "failures": [asdict(s) | {"tokens": len(s.tokens)} for s in failed[:20]],
    }


def log_lines(stack: LocalStack, needle: str, limit: int = 30) -> list[str]:
    """The lines of the stack's logs that mention `needle` (a session id), last ones first cut."""
    lines = []
    for node in stack.nodes:
        if node.log.is_file():
            for line in node.log.read_text(errors="replace").splitlines():
                if needle in line:
                    lines.append(f"{node.log.name}: {line[:300]}")
    return lines[-limit:]


def targets(faults: dict[str, dict], bench: FaultBench) -> list[dict]:
    out = []

    def clean(name: str) -> bool:
        s = faults[name]
        bad = s["failed_sessions"] + s["client_errors"] + s["process_deaths"]
        tokens = s["duplicated_tokens"] + s["extra_tokens"] + s["missing_tokens"] + s["wrong_tokens"]
        return bad == 0 and tokens == 0 and s["identical"] == s["sessions"]

    for name, s in faults.items():
        fault = FAULTS[name]
        label = f" {bench.stopped_s(fault):g} s" if fault.action in ("hang", "pause", "unreachable") else ""
        value = {
            "trials": s["trials"],
            "identical": f"{s['identical']}/{s['sessions']}",
            "client_errors": s["client_errors"],
            "duplicated_or_missing_tokens": s["duplicated_tokens"] + s["extra_tokens"] + s["missing_tokens"],
            "failed_sessions": s["failed_sessions"],
        }
        out.append(
            {
                "name": f"{name}{label}: every output identical, 0 client errors, 0 duplicated or missing tokens",
                "value": value,
                "pass": clean(name),
            }
        )
    return out


def run_faults(
    bench: FaultBench, plan: dict[str, int], baseline_trials: int = 3, write: Callable[[dict], None] | None = None
) -> dict:
    """The baseline, then `plan`'s trials (fault name -> count) in order; the report's results part. `write`
    gets the report so far after each fault (a long run leaves what it measured)."""
    report: dict[str, Any] = {}
    log.info("baseline: %d trials of %d sessions", baseline_trials, bench.sessions)
    baseline = bench.baseline(max(1, baseline_trials))
    report["baseline"] = summarize(baseline, bench.baseline_s)
    report["baseline"]["median_session_s"] = round(bench.baseline_s, 3)
    report["faults"] = {}
    for name, count in plan.items():
        fault = FAULTS[name]
        records = []
        for index in range(count):
            record = bench.trial(fault, index)
            records.append(record)
            bad = [s for s in record.sessions if not s.identical or s.store]
            log.info(
                "%s %d/%d: %s at %.1f s (%d sessions), lasted %.1f s; %d/%d identical, %d resumes, %.1f s",
                name,
                index + 1,
                count,
                record.victim,
                record.at_s,
                record.hit,
                record.heal_s,
                len(record.sessions) - len(bad),
                len(record.sessions),
                sum(s.resumes for s in record.sessions),
                record.seconds,
            )
            for s in bad:
                log.error("%s: %s (store: %s)", s.session_id, s.error or "output differs", s.store or "ok")
        summary = summarize(records, bench.baseline_s, fault)
        for failure in summary["failures"]:
            failure["log"] = log_lines(bench.stack, failure["session_id"])
        report["faults"][name] = summary
        report["targets"] = targets(report["faults"], bench)
        if write is not None:
            write(report)
    report["targets"] = targets(report["faults"], bench)
    return report


# -- command line -----------------------------------------------------------------------------------------------


def parse_plan(text: str) -> dict[str, int]:
    """`name=count,...` (a bare name: its default count; `all`: every fault at its default)."""
    plan: dict[str, int] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition("=")
        names = list(FAULTS) if name == "all" else [name]
        for n in names:
            if n not in FAULTS:
                raise SystemExit(f"unknown fault {n!r}; faults: {', '.join(FAULTS)}")
            plan[n] = int(count) if count else DEFAULT_TRIALS[n]
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default="all", help="name=count,... in order (default: all, at the default counts)")
    p.add_argument("--baseline-trials", type=int, default=3, help="uninterrupted trials first")
    p.add_argument("--sessions", type=int, default=4, help="sessions per trial, started together")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (the model's held-out ones)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompts cut to this many tokens")
    p.add_argument("--hang-s", type=float, default=60.0, help="how long a hung drafter or verifier stays stopped")
    p.add_argument(
        "--controller-hang-s",
        type=float,
        default=100.0,
        help="how long a hung controller stays stopped (default: longer than the SDK's keepalive, 60 + 20 s, "
        "takes to give up on its connection, so that its clients resume on the other controller)",
    )
    p.add_argument("--redis-down-s", type=float, default=10.0, help="how long Redis is paused or unreachable")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of one request (the SDK's), s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="loadtest/results/faults.json")
    g = p.add_argument_group("the stack")
    g.add_argument("--model-dir", help="default: the reference model once built (make model), else the demo model")
    g.add_argument("--exit-layer", type=int)
    g.add_argument("--exit-head", default="")
    g.add_argument("--dtype", default="float32", help="float32: greedy outputs compare with transformers' own")
    g.add_argument("--controllers", type=int, default=2)
    g.add_argument("--drafters", type=int, default=2)
    g.add_argument("--verifiers", type=int, default=2)
    g.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    g.add_argument("--log-dir", default=".cache/faults-stack-logs", help="the stack's process logs")
    args = p.parse_args(argv)
    args.plan = parse_plan(args.faults)
    return args


def prompt_ids(model_dir: str | Path, prompts: list, count: int, max_tokens: int) -> list[list[int]]:
    """`count` prompts as token ids, cut to `max_tokens` (texts are tokenized like the controller does)."""
    from controller.text import model_facts

    codec = model_facts(str(model_dir)).codec
    out = []
    for prompt in prompts[:count]:
        ids = codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out.append(ids[:max_tokens])
    return out


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through fault_stack, which stops the stack's processes


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _stop)
    from serving.models import default_model

    prompts: list = []
    if args.model_dir is None:
        model = default_model()
        args.model_dir, args.exit_layer, args.exit_head = str(model.model_dir), model.exit_layer, model.exit_head
        prompts = model.prompts
    elif args.exit_layer is None:
        raise SystemExit("--exit-layer is required with --model-dir")
    if not prompts:
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(3, 300) for _ in range(8)] for _ in range(args.prompts)]
    ids = prompt_ids(args.model_dir, prompts, args.prompts, args.prompt_tokens)
    out = Path(args.out)
    started = time.perf_counter()
    environment = {
        "commit": commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m loadtest.faults", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "stack": {
            "model": Path(args.model_dir).name,
            "model_dir": str(args.model_dir),
            "exit_layer": args.exit_layer,
            "exit_head": args.exit_head or None,
            "dtype": args.dtype,
            "controllers": args.controllers,
            "drafters": args.drafters,
            "verifiers": args.verifiers,
            "state_store": "redis-server, appendonly yes, appendfsync everysec, behind a TCP proxy",
            "threads_per_process": args.threads,
            "client": "EesdClient, ipv4: target of every controller, round_robin, default RetryPolicy",
        },
    }
    config = {
        "sessions_per_trial": args.sessions,
        "max_new_tokens": args.max_new_tokens,
        "greedy": True,
        "prompts": len(ids),
        "prompt_tokens": [len(p) for p in ids],
        "hang_s": args.hang_s,
        "controller_hang_s": args.controller_hang_s,
        "redis_down_s": args.redis_down_s,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "plan": args.plan,
        "baseline_trials": args.baseline_trials,
    }

    def write(results: dict) -> None:
        environment["seconds"] = round(time.perf_counter() - started, 1)
        environment["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"environment": environment, "config": config, **results}
        out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")

    log.info("references: transformers greedy of %d prompts, %d tokens", len(ids), args.max_new_tokens)
    reference = functools.partial(greedy_reference, str(args.model_dir))
    for prompt in ids:  # cached, and done before the stack competes for the CPU
        reference(prompt, args.max_new_tokens)
    with fault_stack(
        args.model_dir,
        args.exit_layer,
        args.exit_head,
        args.dtype,
        args.log_dir,
        args.controllers,
        args.drafters,
        args.verifiers,
        args.threads,
    ) as (stack, proxy):
        bench = FaultBench(
            stack,
            proxy,
            ids,
            reference,
            args.sessions,
            args.max_new_tokens,
            args.hang_s,
            args.redis_down_s,
            args.seed,
            args.timeout,
            args.controller_hang_s,
        )
        results = run_faults(bench, args.plan, args.baseline_trials, write)
    write(results)
    print(out)
    failed = [t["name"] for t in results["targets"] if not t["pass"]]
    for name in failed:
        print(f"FAILED: {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
