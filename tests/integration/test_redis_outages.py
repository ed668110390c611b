"""Sessions through real Redis outages: the controller's round loop (in-process, with a fake verifier that
commits a known token per round) against real redis-server processes that this module pauses (SIGSTOP),
kills, restarts empty or restarts while they load their data, a Sentinel failover, and TLS.

Each test owns its redis-server(s) on free loopback ports; nothing is shared with the session's server."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from controller.discovery import make_discovery
from controller.nodes import RoundOutcome
from controller.patience import StoreUnavailable
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import RedisStateStore, SessionRecord, open_state_store, parse_sentinel_url
from eesd.errors import InvalidArgument, Unavailable
from eesd.params import GenerationParams, PolicyParams
from eesd.rounds import Verdict

ROOT = Path(__file__).resolve().parents[2]
CERTS = ROOT / "tests" / "client" / "certs"
PROMPT = [3, 4, 5]


def token(round_index: int) -> int:
    return 1000 + round_index


def reference(rounds: int) -> list[int]:
    return [token(r) for r in range(rounds)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """One redis-server (or sentinel) on a fixed loopback port, in its own directory."""

    def __init__(self, workdir: Path, *args: str, port: int = 0, sentinel_conf: str = ""):
        self.workdir, self.args, self.port = workdir, list(args), port or free_port()
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, wait_ready: bool = True) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found on PATH: run `make redis`", pytrace=False)
        if self.sentinel_conf:
            conf = self.workdir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n{self.sentinel_conf}")
            cmd = [binary, str(conf), "--sentinel"]
        else:
            cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), *self.args]
        cmd += ["--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._listens():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on {self.port} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()
        return self

    def _listens(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, f"redis on {self.port} not ready:\n{self.log.read_text()[-2000:]}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def servers(tmp_path) -> Iterator[list[RedisProcess]]:
    """The servers a test starts (append here); all stopped at the end."""
    started: list[RedisProcess] = []
    yield started
    for server in reversed(started):
        server.stop()


def no_persistence() -> list[str]:
    return ["--save", "", "--appendonly", "no"]


class SlowVerifier:
    """Commits token(round) per round after `round_s` (verifier-only decoding)."""

    def __init__(self, round_s: float = 0.02):
        self.round_s = round_s

    async def verify(self, verifier, request):
        await asyncio.sleep(self.round_s)
        length = request.base_length + len(request.pending)
        verdict = Verdict(request.session_id, request.round_index, 0, token(request.round_index), length)
        return RoundOutcome(request.draft, verdict, None, 0.0, 1.0, 0.0)

    async def open_session(self, *args):
        return 0

    async def close_session(self, *args):
        pass


def round_loop(store, store_wait_s: float = 30.0, round_s: float = 0.02) -> RoundLoop:
    router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
    return RoundLoop(store, router, SlowVerifier(round_s), frozenset(), 4096, store_wait_s=store_wait_s)


async def stream(loop: RoundLoop, rounds: int, at_round: int, fault) -> tuple[list[int], list]:
    """Streams a session of `rounds` rounds; runs fault() in a thread once the client got round at_round."""
    params = GenerationParams(rounds, policy=PolicyParams(name="off", k_max=0), stop_on_eos=False)
    tokens, events, pending = [], [], []
    try:
        async for event in loop.generate(PROMPT, params, "s-" + uuid.uuid4().hex[:8]):
            events.append(event)
            if isinstance(event, RoundEvent):
                tokens += event.tokens
                if event.round_index == at_round:
                    pending.append(asyncio.ensure_future(asyncio.to_thread(fault)))
    finally:
        await asyncio.gather(*pending)
    return tokens, events


def session_of(events) -> str:
    return events[0].session_id


def test_a_session_rides_out_redis_paused_for_3_s(servers, tmp_path):
    server = RedisProcess(tmp_path / "r", *no_persistence()).start()
    servers.append(server)

    def pause():
        server.signal(signal.SIGSTOP)
        time.sleep(3)
        server.signal(signal.SIGCONT)

    async def scenario():
        store = RedisStateStore(f"redis://127.0.0.1:{server.port}/0")
        loop = round_loop(store)
        start = time.monotonic()
        tokens, events = await stream(loop, 60, 10, pause)
        elapsed = time.monotonic() - start
        record = await store.get_session(session_of(events))
        await loop.aclose()
        await store.close()
        return tokens, events, record, elapsed

    tokens, events, record, elapsed = asyncio.run(scenario())
    assert tokens == reference(60) and isinstance(events[-1], Finished)
    assert (record.status, record.committed) == ("finished", PROMPT + reference(60))
    assert elapsed >= 3


def test_a_session_survives_redis_restarted_empty(servers, tmp_path):
    """kill -9, and a new redis-server without persistence on the same port a second later: the
    controller writes the session back from memory instead of failing with NOT_FOUND."""
    server = RedisProcess(tmp_path / "r", *no_persistence()).start()
    servers.append(server)

    def restart_empty():
        server.kill()
        time.sleep(1)
        server.start()

    async def scenario():
        store = RedisStateStore(f"redis://127.0.0.1:{server.port}/0")
        loop = round_loop(store)
        tokens, events = await stream(loop, 60, 10, restart_empty)
        record = await store.get_session(session_of(events))
        await loop.aclose()
        await store.close()
        return tokens, events, record

    tokens, events, record = asyncio.run(scenario())
    assert tokens == reference(60) and isinstance(events[-1], Finished)
    assert (record.status, record.committed, record.next_round) == ("finished", PROMPT + reference(60), 60)


def test_a_session_waits_while_a_restarted_redis_loads_its_data(servers, tmp_path):
    """Redis restarted from an RDB snapshot taken rounds ago, loading slowly (LOADING answers for ~2 s):
    the round waits, then finds the session behind and brings it forward."""
    slow_load = [*no_persistence(), "--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024"]
    server = RedisProcess(tmp_path / "r", *slow_load).start()
    servers.append(server)
    bulk = server.client().pipeline(transaction=False)
    for i in range(10_000):
        bulk.set(f"filler:{i}", "x")
    bulk.execute()
    saw_loading = []

    def restart_from_snapshot():
        server.client().save()  # the snapshot holds the session at about this round
        time.sleep(0.3)  # rounds go on past it
        server.kill()
        server.start(wait_ready=False)
        try:
            # PING answers while loading; data commands do not. No retries: redis-py waits out LOADING.
            redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0)).exists("eesd:nothing")
        except redis.BusyLoadingError:
            saw_loading.append(True)
        server.wait_ready()

    async def scenario():
        store = RedisStateStore(f"redis://127.0.0.1:{server.port}/0")
        loop = round_loop(store)
        tokens, events = await stream(loop, 60, 10, restart_from_snapshot)
        record = await store.get_session(session_of(events))
        await loop.aclose()
        await store.close()
        return tokens, events, record

    tokens, events, record = asyncio.run(scenario())
    assert saw_loading, "redis was never seen loading: the test did not test that"
    assert tokens == reference(60) and isinstance(events[-1], Finished)
    assert (record.status, record.committed, record.next_round) == ("finished", PROMPT + reference(60), 60)


def test_past_the_budget_the_session_stops_and_redis_keeps_exactly_what_the_client_got(servers, tmp_path):
    """Redis stopped for 6 s against a 2 s budget: the session stops with UNAVAILABLE. The commit sent
    while Redis was stopped sits in its socket and applies when it resumes, though the client never got
    those tokens; the failure, written when Redis answers again, takes it back."""
    server = RedisProcess(tmp_path / "r", *no_persistence()).start()
    servers.append(server)

    def pause():
        server.signal(signal.SIGSTOP)
        time.sleep(6)
        server.signal(signal.SIGCONT)

    async def scenario():
        store = RedisStateStore(f"redis://127.0.0.1:{server.port}/0")
        loop = round_loop(store, store_wait_s=2.0)
        params = GenerationParams(200, policy=PolicyParams(name="off", k_max=0), stop_on_eos=False)
        tokens, session_id, pausing = [], "", None
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            async for event in loop.generate(PROMPT, params, "s-past-budget"):
                session_id = event.session_id
                tokens += event.tokens
                if event.round_index == 10:
                    pausing = asyncio.ensure_future(asyncio.to_thread(pause))
        stopped_after = time.monotonic() - start
        assert loop.patience.pending_ends == [session_id]
        await pausing
        deadline = time.monotonic() + 20
        while loop.patience.pending_ends and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        record = await store.get_session(session_id)
        await loop.aclose()
        await store.close()
        return raised.value, tokens, record, stopped_after

    error, tokens, record, stopped_after = asyncio.run(scenario())
    assert error.status == "UNAVAILABLE"
    assert stopped_after < 6  # the budget, not the outage, decided
    assert record.status == "failed" and record.error_code == "UNAVAILABLE"
    assert record.committed == PROMPT + tokens and record.next_round == len(tokens)
    assert tokens == reference(len(tokens))


# -- Sentinel ----------------------------------------------------------------------------------------------


def start_sentinel_group(servers: list[RedisProcess], tmp_path: Path) -> tuple[RedisProcess, RedisProcess, str]:
    """A master, a replica of it and one sentinel (quorum 1) watching them as `eesd`; returns the URL."""
    master = RedisProcess(tmp_path / "master", *no_persistence()).start()
    servers.append(master)
    replica = RedisProcess(tmp_path / "replica", *no_persistence(), "--replicaof", "127.0.0.1", str(master.port))
    servers.append(replica.start())
    sentinel = RedisProcess(
        tmp_path / "sentinel",
        sentinel_conf=(
            f"sentinel monitor eesd 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds eesd 1000\n"
            "sentinel failover-timeout eesd 10000\n"
        ),
    )
    servers.append(sentinel.start())
    deadline = time.monotonic() + 30
    while True:  # the sentinel has found the replica, and the replica is in sync
        replicas = sentinel.client().sentinel_slaves("eesd")
        if replicas and replica.client().info("replication").get("master_link_status") == "up":
            break
        assert time.monotonic() < deadline, "the sentinel did not see the replica"
        time.sleep(0.1)
    return master, replica, f"redis+sentinel://127.0.0.1:{sentinel.port}/eesd/0"


def test_the_store_works_through_sentinel(servers, tmp_path):
    master, replica, url = start_sentinel_group(servers, tmp_path)

    async def scenario():
        store = open_state_store(url)
        await store.ping()
        await store.create_session(SessionRecord("s1", [1, 2], 2, 0, {"a": 1.0}, {}, "d0:1", "v0:1"))
        await store.commit_round("s1", 0, [7, 8], {"a": 2.0})
        record = await store.get_session("s1")
        routes = await store.count_routes()
        await store.close()
        return record, routes

    record, routes = asyncio.run(scenario())
    assert record.committed == [1, 2, 7, 8] and record.policy_state == {"a": 2.0}
    assert routes == {"d0:1": 1, "v0:1": 1}
    assert master.client().exists("eesd:session:s1")  # written to the master the sentinel names


def test_a_session_rides_out_a_sentinel_failover(servers, tmp_path):
    """The master is killed mid-session: the sentinel promotes the replica, the store follows it, and a
    commit the replica never received is written back by the controller."""
    master, replica, url = start_sentinel_group(servers, tmp_path)

    async def scenario():
        store = open_state_store(url)
        loop = round_loop(store, round_s=0.03)
        start = time.monotonic()
        tokens, events = await stream(loop, 150, 10, master.kill)
        elapsed = time.monotonic() - start
        record = await store.get_session(session_of(events))
        await loop.aclose()
        await store.close()
        return tokens, events, record, elapsed

    tokens, events, record, elapsed = asyncio.run(scenario())
    assert replica.client().info("replication")["role"] == "master"
    assert tokens == reference(150) and isinstance(events[-1], Finished)
    assert (record.status, record.committed) == ("finished", PROMPT + reference(150))
    print(f"session of 150 rounds across a sentinel failover: {elapsed:.1f} s")


def test_sentinel_urls_parse_and_bad_ones_are_refused():
    parsed = parse_sentinel_url("rediss+sentinel://:pw@h1:26380,h2,[::1]:26381/mymaster/2?sentinel_auth=no")
    assert parsed.sentinels == [("h1", 26380), ("h2", 26379), ("::1", 26381)]
    assert (parsed.service_name, parsed.db, parsed.password, parsed.ssl, parsed.sentinel_auth) == (
        "mymaster",
        2,
        "pw",
        True,
        False,
    )
    for bad in (
        "redis+sentinel://h1:26379",  # no service name
        "redis+sentinel://h1:26379/m/x",  # db not a number
        "redis+sentinel://h1:99999/m",
        "redis+sentinel://h1/m?oops=1",
    ):
        with pytest.raises(InvalidArgument, match="redis_url"):
            open_state_store(bad)
    with pytest.raises(InvalidArgument, match="redis_ca_file"):
        open_state_store("redis://127.0.0.1:6379/0", ca_file=str(CERTS / "ca.pem"))


# -- TLS ---------------------------------------------------------------------------------------------------


def test_rediss_with_a_ca_file(servers, tmp_path):
    tls = [
        "--port",
        "0",
        "--tls-cert-file",
        str(CERTS / "server.pem"),
        "--tls-key-file",
        str(CERTS / "server.key"),
        "--tls-ca-cert-file",
        str(CERTS / "ca.pem"),
        "--tls-auth-clients",
        "no",
        *no_persistence(),
    ]
    port = free_port()
    server = RedisProcess(tmp_path / "tls", "--tls-port", str(port), *tls, port=port).start(wait_ready=False)
    servers.append(server)

    async def scenario():
        url = f"rediss://127.0.0.1:{port}/0"
        store = open_state_store(url, ca_file=str(CERTS / "ca.pem"))
        await store.ping()
        await store.create_session(SessionRecord("s1", [1, 2], 2, 0, {}, {}))
        record = await store.get_session("s1")
        await store.close()
        unverified = RedisStateStore(url, connect_timeout_s=1, retries=0)  # the system CAs do not know it
        with pytest.raises(Unavailable, match="certificate verify failed"):
            await unverified.ping()
        await unverified.close()
        return record

    assert asyncio.run(scenario()).committed == [1, 2]
