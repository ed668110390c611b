"""A controller killed mid-stream loses no session (docs/architecture.md §8.7): its client resumes the
session, by id and the number of tokens it already has, on the controller that comes back (state in Redis),
and gets every remaining token exactly once; the whole output equals the model's greedy output.

Raw stubs, so that what is checked is the server's contract (the SDK resumes by itself on top of it).
"""

import uuid

import grpc

from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from tests.e2e.helpers import all_alive, log_tails, oracle

PROMPT = [31, 32, 33, 34]
MAX_NEW = 300  # hundreds of rounds: the session is still running when the controller is killed


def request(session_id: str, received: int = 0) -> controller_pb2.GenerateRequest:
    return controller_pb2.GenerateRequest(
        prompt_ids=controller_pb2.TokenIds(ids=PROMPT),
        max_new_tokens=MAX_NEW,
        session_id=session_id,
        ignore_eos=True,
        received_tokens=received,
    )


def test_a_stream_cut_by_a_controller_kill_resumes_exactly_once(main_stack, main_model):
    controller = main_stack.by_role("controller")[0]
    session_id = f"resume-{uuid.uuid4().hex[:8]}"
    tokens: list[int] = []
    with grpc.insecure_channel(controller.address) as channel:
        stream = controller_pb2_grpc.ControllerServiceStub(channel).Generate(request(session_id), timeout=120)
        try:
            for response in stream:
                tokens += response.chunk.token_ids
                if len(tokens) >= 20:
                    main_stack.stop_node(controller, sig=9)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        else:
            raise AssertionError("the stream finished before the controller was killed")
    received = len(tokens)
    main_stack.restart_node(controller)
    with grpc.insecure_channel(controller.address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        responses = list(stub.Generate(request(session_id, received), timeout=120))
        summary = responses[-1].summary
        tokens += [t for response in responses[:-1] for t in response.chunk.token_ids]
        session = stub.GetSession(controller_pb2.GetSessionRequest(session_id=session_id), timeout=30).session
    assert tokens == list(oracle(main_model, PROMPT, MAX_NEW)), log_tails(main_stack)
    assert summary.usage.completion_tokens == MAX_NEW
    assert session.state == controller_pb2.SESSION_STATE_FINISHED
    assert all_alive(main_stack)
