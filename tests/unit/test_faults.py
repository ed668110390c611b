"""The fault-trial harness's own parts (loadtest/faults.py) and the LocalStack options it uses."""

import http.server
import socket
import threading

import pytest
from eesd_client.errors import NotFoundError

from loadtest.faults import (
    DEFAULT_TRIALS,
    FAULTS,
    FaultBench,
    SessionOutcome,
    TcpProxy,
    align,
    parse_plan,
    percentiles,
    running_calls,
)
from serving.local_stack import LocalStack, free_port


def test_align_counts_duplicates_gaps_and_wrong_tokens():
    ref = [1, 2, 3, 4, 5, 6]
    assert align(ref, ref) == {"duplicated": 0, "extra": 0, "missing": 0, "wrong": 0}
    assert align([1, 2, 3, 2, 3, 4, 5, 6], ref)["duplicated"] == 2  # a resume that sent 2, 3 twice
    assert align([1, 2, 5, 6], ref) == {"duplicated": 0, "extra": 0, "missing": 2, "wrong": 0}
    assert align([1, 2, 9, 4, 5, 6], ref) == {"duplicated": 0, "extra": 0, "missing": 0, "wrong": 1}
    assert align([1, 2, 3, 4, 5, 6, 7], ref) == {"duplicated": 0, "extra": 1, "missing": 0, "wrong": 0}


def test_parse_plan():
    assert parse_plan("all") == DEFAULT_TRIALS
    assert list(DEFAULT_TRIALS) == list(FAULTS)
    assert parse_plan("redis-pause=2, controller-kill") == {"redis-pause": 2, "controller-kill": 100}
    with pytest.raises(SystemExit, match="unknown fault"):
        parse_plan("controller-explode=1")


def test_percentiles():
    assert percentiles([]) == {"n": 0, "p50": None, "p95": None, "max": None}
    assert percentiles([3.0, 1.0, 2.0]) == {"n": 3, "p50": 2.0, "p95": 3.0, "max": 3.0}


@pytest.mark.parametrize("prefix", ["eesd:", "vllm:"])
def test_running_calls_reads_the_controllers_gauge_whatever_its_prefix(prefix):
    body = f"# TYPE {prefix}num_requests_running gauge\n{prefix}num_requests_running 3.0\n".encode()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert running_calls(f"http://127.0.0.1:{server.server_port}/metrics") == 3
    finally:
        server.shutdown()
        server.server_close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_tcp_proxy_forwards_cuts_and_restores():
    server, upstream = _echo_server()
    proxy = TcpProxy(free_port(), upstream).start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        proxy.cut()
        assert client.recv(16) == b""  # the open connection is closed
        with pytest.raises(ConnectionRefusedError):  # and a new one refused
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.restore()
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"pong")
        assert again.recv(16) == b"pong"
        again.close()
        client.close()
    finally:
        proxy.close()
        server.close()


def test_local_stack_with_two_controllers_sharing_redis_behind_a_proxy(tmp_path):
    stack = LocalStack(
        tmp_path / "model",
        1,
        redis=True,
        log_dir=tmp_path,
        controllers=2,
        redis_args=("--appendonly", "yes"),
        store_port=4242,
    )
    controllers = stack.by_role("controller")
    assert [c.log.name for c in controllers] == ["controller.log", "controller1.log"]
    for controller in controllers:
        assert controller.args[controller.args.index("--redis-url") + 1] == "redis://127.0.0.1:4242/0"
    assert stack.controller_address == controllers[0].address
    assert stack.controller_target == f"ipv4:{controllers[0].address},{controllers[1].address}"
    redis = stack.by_role("redis")[0].args
    assert redis[-2:] == ["--appendonly", "yes"]  # after the defaults: it wins
    assert redis[redis.index("--dir") + 1] == str(tmp_path)
    single = LocalStack(tmp_path / "model", 1, log_dir=tmp_path)
    assert len(single.by_role("controller")) == 1 and single.controller_target == f"ipv4:{single.controller_address}"


@pytest.mark.parametrize(("hit", "may_be_gone", "mismatch"), [(True, False, True), (False, True, False)])
def test_a_record_redis_lost_with_its_data_is_a_mismatch_only_if_it_should_have_been_written_back(
    hit, may_be_gone, mismatch
):
    """A session that ended before Redis started again empty has no record left, by design; one still
    running then must have been written back by its controller."""

    class Client:
        def get_session(self, session_id, **kwargs):
            raise NotFoundError(f"session {session_id!r} not found")

    bench = FaultBench(None, None, [[1, 2]], lambda prompt, n: [3] * n, max_new_tokens=2)
    outcome = SessionOutcome("s", 0, tokens=[3, 3], hit=hit)
    bench._check(Client(), outcome, record_may_be_gone=may_be_gone)
    assert outcome.identical and bool(outcome.store) == mismatch
    assert outcome.store.startswith("GetSession: ") or not mismatch
