"""The state store goes away under a running session, on a whole stack (controller, drafter, verifier and
redis-server as processes): Redis stopped (SIGSTOP) for 4 s, and Redis killed and restarted empty (no
persistence). Each session still streams exactly the HF greedy reference, and the store ends up holding
the finished session with every token the client got (docs/architecture.md §8.1)."""

import signal
import threading
import time

import pytest
from eesd_client import EesdClient, SessionState

from tests.e2e.helpers import log_tails, oracle, start_stack, stop_stack

PROMPT = [31, 32, 33, 34]
MAX_NEW = 300


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory, require_redis):
    """llama, N=1, one drafter and one verifier, Redis without persistence, the default 30 s store budget."""
    stack = start_stack(
        tiny_models["llama"],
        1,
        tmp_path_factory.mktemp("store-outage-logs"),
        redis=True,
        controller_args=("--store-wait-s", "30"),
    )
    yield stack
    stop_stack(stack)


def generate_through(stack, fault) -> tuple[tuple[int, ...], object, float]:
    """Streams a session and runs fault(redis node) in a thread after the first chunk; returns the tokens,
    the stored session afterwards and the stream's seconds."""
    redis_node = stack.by_role("redis")[0]
    with EesdClient(stack.controller_address, timeout=180) as client:
        start = time.monotonic()
        stream = client.generate(PROMPT, max_new_tokens=MAX_NEW, policy="fixed", k_max=3, stop_on_eos=False)
        tokens = list(next(stream).token_ids)
        worker = threading.Thread(target=fault, args=(redis_node,))
        worker.start()
        for chunk in stream:
            tokens += chunk.token_ids
        elapsed = time.monotonic() - start
        worker.join()
        stored = client.get_session(stream.session_id, include_token_ids=True)
    return tuple(tokens), stored, elapsed


def test_a_session_rides_out_redis_stopped_for_4_s(stack, tiny_models):
    def pause(node):
        node.process.send_signal(signal.SIGSTOP)
        time.sleep(4)
        node.process.send_signal(signal.SIGCONT)

    tokens, stored, elapsed = generate_through(stack, pause)
    assert tokens == oracle(tiny_models["llama"], PROMPT, MAX_NEW), log_tails(stack)
    assert stored.state == SessionState.FINISHED
    assert stored.committed_token_ids == tuple(PROMPT) + tokens
    print(f"300 tokens with Redis stopped 4 s: {elapsed:.1f} s")


def test_a_session_survives_redis_restarted_empty(stack, tiny_models):
    def restart_empty(node):
        stack.restart_node(node)  # kill -9, then a new redis-server on the same port, no data

    tokens, stored, elapsed = generate_through(stack, restart_empty)
    assert tokens == oracle(tiny_models["llama"], PROMPT, MAX_NEW), log_tails(stack)
    assert stored.state == SessionState.FINISHED
    assert stored.committed_token_ids == tuple(PROMPT) + tokens
    controller_log = stack.by_role("controller")[0].log.read_text()
    assert "the state store had lost it" in controller_log
    print(f"300 tokens with Redis restarted empty: {elapsed:.1f} s")
