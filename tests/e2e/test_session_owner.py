"""A node's sessions belong to the controller that drives them (docs/architecture.md §8.2): calls made
straight to a node with a victim's session id, but without its owner token, never change the victim's
output, and a node whose session table is filled by such calls makes room for driven sessions.
"""

import concurrent.futures
import random
import threading
import uuid

import grpc
from eesd_client import EesdClient

from eesd_proto.eesd.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from tests.e2e.helpers import all_alive, log_tails, oracle

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
MAX_NEW = 40
VOCAB = 384  # eesd.tiny checkpoints


def node_stubs(stack) -> list[tuple[object, object]]:
    """(stub, proto module) of every drafter and verifier."""
    stubs = []
    for node in stack.nodes:
        if node.role in ("drafter", "verifier"):
            module = drafter_pb2 if node.role == "drafter" else verifier_pb2
            grpc_module = drafter_pb2_grpc if node.role == "drafter" else verifier_pb2_grpc
            stub_cls = getattr(grpc_module, f"{node.role.capitalize()}ServiceStub")
            stubs.append((stub_cls(grpc.insecure_channel(node.address)), module))
    return stubs


def prefix(module) -> str:
    return "DrafterService" if module is drafter_pb2 else "VerifierService"


def test_calls_without_the_owner_token_cannot_touch_a_running_session(main_stack, main_model):
    """Prefill (with other tokens), CloseSession and Draft aimed at the victims' ids while they stream."""
    victims = [f"victim-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(PROMPTS))]
    stubs = node_stubs(main_stack)
    done = threading.Event()
    rng = random.Random(7)

    def attack() -> int:
        calls = 0
        while not done.is_set() and calls < 2000:  # bounded whatever happens to the victims
            session_id = rng.choice(victims)
            stub, module = rng.choice(stubs)
            # Longer than any victim: a cache it overwrote would cover the victim's next base with wrong keys.
            prefill = getattr(module, prefix(module) + "PrefillRequest")(
                session_id=session_id, base_length=0, token_ids=[rng.randrange(VOCAB) for _ in range(64)]
            )
            close = getattr(module, prefix(module) + "CloseSessionRequest")(session_id=session_id)
            for call, request in ((stub.Prefill, prefill),) if rng.random() < 0.8 else ((stub.CloseSession, close),):
                try:
                    call(request, timeout=30)
                except grpc.RpcError as error:  # a refusal is fine; a wedge or a crash is not
                    assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error
                calls += 1
        return calls

    with EesdClient(main_stack.controller_address, timeout=120) as client:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            attacker = pool.submit(attack)
            runs = [
                pool.submit(client.generate_text, prompt, max_new_tokens=MAX_NEW, stop_on_eos=False, session_id=sid)
                for prompt, sid in zip(PROMPTS, victims, strict=True)
            ]
            outputs = [run.result().token_ids for run in runs]
            done.set()
            assert attacker.result() > 0
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output == oracle(main_model, prompt, MAX_NEW)
    assert all_alive(main_stack), log_tails(main_stack)


def test_a_node_filled_by_unowned_sessions_makes_room_for_driven_ones(main_stack, main_model):
    """Every verifier's table is filled by OpenSession calls made straight to it; a generation through the
    controller waits for admission until the oldest of them may be evicted (session_evict_s), then runs."""
    verifiers = [(stub, module) for stub, module in node_stubs(main_stack) if module is verifier_pb2]
    squatters = [f"squatter-{i}" for i in range(256)]  # ModelNodeConfig.max_sessions
    for stub, _ in verifiers:
        for session_id in squatters:
            try:
                stub.OpenSession(verifier_pb2.VerifierServiceOpenSessionRequest(session_id=session_id), timeout=30)
            except grpc.RpcError as error:  # full already (running sessions hold places too)
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    try:
        with EesdClient(main_stack.controller_address, timeout=120) as client:
            got = client.generate_text(PROMPTS[0], max_new_tokens=12, stop_on_eos=False).token_ids
        assert got == oracle(main_model, PROMPTS[0], 12)
    finally:
        for stub, _ in verifiers:
            for session_id in squatters:
                stub.CloseSession(verifier_pb2.VerifierServiceCloseSessionRequest(session_id=session_id), timeout=30)
