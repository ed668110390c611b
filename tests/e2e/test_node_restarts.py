"""Nodes die between rounds of a session; the session finishes with the same tokens (KV caches are soft
state, committed tokens hard state). Streaming lets the test kill a node after the first chunk.

On the main stack (2 drafters, 2 verifiers) the session moves to the other node. The controller-side
check drives controller.round_loop in-process against a real verifier and a drafter address where nothing
listens: verifier-only decoding. Slow (own stack): on a solo stack (1 drafter, 1 verifier) the session
waits for its restarted verifier and re-prefills it, or decodes verifier-only when its drafter is killed.
"""

import asyncio
import concurrent.futures
import signal
import time

import pytest
from eesd_client import EesdClient, SessionState

from controller.discovery import make_discovery
from controller.nodes import NodeClients
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import open_state_store
from eesd.params import GenerationParams, PolicyParams
from serving.local_stack import free_port
from tests.e2e.helpers import EOS, all_alive, log_tails, node_at, oracle, start_stack, stop_stack

PROMPT = [21, 22, 23, 24, 25]
MAX_NEW = 300  # hundreds of rounds: the session is still running when the node is killed after chunk 1


@pytest.fixture(scope="module")
def solo_stack(tiny_models, tmp_path_factory):
    """llama, N=2, one drafter and one verifier, in-memory state store."""
    stack = start_stack(tiny_models["llama"], 2, tmp_path_factory.mktemp("solo-stack-logs"))
    yield stack
    stop_stack(stack)


def generate_with_restart(stack, role: str, kill) -> tuple[tuple[int, ...], str, str]:
    """Streams a session, calls kill(node) on its `role` node after the first chunk, drains the stream.
    Returns (tokens, the node's address before, the session's node of that role afterwards)."""
    with EesdClient(stack.controller_address, timeout=180) as client:
        stream = client.generate(PROMPT, max_new_tokens=MAX_NEW, policy="fixed", k_max=3, stop_on_eos=False)
        tokens = list(next(stream).token_ids)
        info = client.get_session(stream.session_id)
        assert info.state == SessionState.ACTIVE, "the session ended before the node could be killed"
        before = getattr(info, f"{role}_id")
        kill(node_at(stack, before))
        for chunk in stream:
            tokens += chunk.token_ids
        after = client.get_session(stream.session_id)
        assert after.state == SessionState.FINISHED
    return tuple(tokens), before, getattr(after, f"{role}_id")


@pytest.mark.parametrize("role", ["drafter", "verifier"])
def test_session_moves_to_the_other_node_when_its_node_restarts(main_stack, main_model, role):
    tokens, before, after = generate_with_restart(main_stack, role, main_stack.restart_node)
    assert tokens == oracle(main_model, PROMPT, MAX_NEW), log_tails(main_stack)
    assert after != before and after in {n.address for n in main_stack.by_role(role)}
    assert all_alive(main_stack)


@pytest.mark.slow
def test_session_waits_for_its_restarted_verifier(solo_stack, tiny_models):
    """The only verifier restarts: the round is retried until it is back, then its cache is re-prefilled."""
    tokens, before, after = generate_with_restart(solo_stack, "verifier", solo_stack.restart_node)
    assert tokens == oracle(tiny_models["llama"], PROMPT, MAX_NEW), log_tails(solo_stack)
    assert after == before
    assert "verifier unavailable" in solo_stack.by_role("controller")[0].log.read_text()


@pytest.mark.slow
def test_session_whose_drafter_is_gone_completes_verifier_only(solo_stack, tiny_models):
    """The only drafter is killed for good mid-session: the session finishes by verifier-only decoding.
    (Leaves the solo stack without its drafter: keep this test last in the module.)"""

    def kill(node):
        solo_stack.stop_node(node, sig=9)

    with EesdClient(solo_stack.controller_address, timeout=180) as client:
        stream = client.generate(PROMPT, max_new_tokens=MAX_NEW, policy="fixed", k_max=3, stop_on_eos=False)
        chunks = [next(stream)]
        kill(solo_stack.by_role("drafter")[0])
        chunks += list(stream)
        result = stream.result()
        info = client.get_session(stream.session_id)
    assert result.token_ids == oracle(tiny_models["llama"], PROMPT, MAX_NEW), log_tails(solo_stack)
    assert chunks[0].stats.drafted > 0  # speculation ran before the kill
    assert chunks[-1].stats.drafted == 0 and chunks[-1].stats.k_chosen == 0  # verifier-only afterwards
    assert info.drafter_id == "" and info.state == SessionState.FINISHED
    # New sessions still work without any drafter.
    with EesdClient(solo_stack.controller_address, timeout=180) as client:
        again = client.generate_text(PROMPT, max_new_tokens=20, stop_on_eos=False)
    assert again.token_ids == oracle(tiny_models["llama"], PROMPT, 20)
    assert again.stats.speculation.drafted == 0


async def _verifier_only_in_process(verifier: str, prompt: list[int], max_new: int):
    dead_drafter = f"127.0.0.1:{free_port()}"  # nothing listens there
    router = Router(make_discovery("static", dead_drafter), make_discovery("static", verifier), down_s=60)
    router.start()
    nodes = NodeClients(timeout_s=30)
    loop = RoundLoop(open_state_store("memory://"), router, nodes, frozenset({EOS}), vocab_size=384)
    tokens, finished = [], None
    try:
        params = GenerationParams(max_new, policy=PolicyParams("fixed", k_max=3), stop_on_eos=False)
        async for event in loop.generate(prompt, params):
            if isinstance(event, RoundEvent):
                tokens += event.tokens
            else:
                finished = event
        await asyncio.sleep(0.2)  # the session's CloseSession calls run in the background
    finally:
        router.stop()
        await nodes.close()
    return tokens, finished, router, dead_drafter


def test_round_loop_with_an_unreachable_drafter_decodes_verifier_only(main_stack, main_model):
    """Controller side: the drafter is unreachable from the first round; the round loop marks it down,
    decodes verifier-only on a real verifier, and leaves no routing load behind."""
    verifier = main_stack.by_role("verifier")[0].address
    tokens, finished, router, dead = asyncio.run(_verifier_only_in_process(verifier, PROMPT, 16))
    assert tuple(tokens) == oracle(main_model, PROMPT, 16)
    assert isinstance(finished, Finished) and finished.finish_reason == "length"
    assert finished.stats.drafted == 0 and finished.stats.rounds == 16
    assert not router.is_up(dead)
    assert all(load == 0 for load in router.load.values()), dict(router.load)


@pytest.mark.parametrize("role", ["drafter", "verifier"])
def test_session_moves_off_a_hung_node(main_stack, main_model, role):
    """SIGSTOP: the node's process is alive but answers nothing (no connection error, no status). The
    controller's health probes find it lost within node_lost_s, end its calls, and the session moves on;
    once the node runs again it is used again."""
    hung = []

    def hang(node):
        node.process.send_signal(signal.SIGSTOP)
        hung.append(node)

    try:
        tokens, before, after = generate_with_restart(main_stack, role, hang)
    finally:
        for node in hung:
            node.process.send_signal(signal.SIGCONT)
    assert tokens == oracle(main_model, PROMPT, MAX_NEW), log_tails(main_stack)
    assert after != before
    controller_log = main_stack.by_role("controller")[0].log.read_text()
    assert f"node {before} has not answered SERVING" in controller_log
    deadline = time.monotonic() + 30
    while f"node {before} answers SERVING again" not in main_stack.by_role("controller")[0].log.read_text():
        assert time.monotonic() < deadline, "the controller did not notice the node running again"
        time.sleep(0.2)
    assert all_alive(main_stack)


@pytest.mark.slow  # ~25 s: restarts a verifier twice
def test_sigterm_ends_a_verifier_with_open_streams_but_no_rounds_at_once(main_stack, main_model):
    """The drafters hold persistent VerifyStreams to every verifier they used; on SIGTERM a verifier ends
    them once their rounds in flight are answered instead of waiting out its grace period for them."""
    verifier = main_stack.by_role("verifier")[0]
    grace = ["--grace-s", "600"]  # far longer than the wait below: only draining can end it in time
    verifier.args += grace
    try:
        main_stack.restart_node(verifier)
        with EesdClient(main_stack.controller_address, timeout=120) as client:
            # Sessions at once go to the least loaded verifiers, so to both once the controller's probes
            # found the restarted one SERVING.
            for _ in range(20):
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    runs = [
                        pool.submit(client.generate_text, PROMPT, max_new_tokens=40, policy="fixed", k_max=3)
                        for _ in range(4)
                    ]
                    used = {client.get_session(run.result().session_id).verifier_id for run in runs}
                if verifier.address in used:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("no session was routed to the restarted verifier")
        verifier.process.send_signal(signal.SIGTERM)
        verifier.process.wait(timeout=60)
        assert "verifier stopped" in verifier.log.read_text()[-4000:]
    finally:
        del verifier.args[-len(grace) :]
        main_stack.restart_node(verifier)
    assert all_alive(main_stack)
