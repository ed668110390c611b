"""A controller whose model_dir is another checkpoint than the nodes serve (a deployment mistake: another
tokenizer, another vocabulary) refuses to route sessions there, naming the difference, instead of streaming
wrong text (docs/architecture.md §8.5)."""

import grpc
import pytest

from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from tests.e2e.helpers import start_stack, stop_stack


@pytest.fixture(scope="module")
def mismatched_stack(tiny_models, tmp_path_factory, require_redis):
    """Nodes serve the tiny llama; the controller reads the tiny qwen2 checkpoint."""
    stack = start_stack(
        tiny_models["llama"],
        1,
        tmp_path_factory.mktemp("mismatch-logs"),
        controller_args=("--model-dir", str(tiny_models["qwen2"])),
    )
    yield stack
    stop_stack(stack)


def test_sessions_are_refused_naming_the_model_difference(mismatched_stack):
    request = controller_pb2.GenerateRequest(prompt_ids=controller_pb2.TokenIds(ids=[3, 4, 5]), max_new_tokens=4)
    with grpc.insecure_channel(mismatched_stack.controller_address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
    assert "model_type: 'llama' != 'qwen2'" in info.value.details()
    log = mismatched_stack.by_role("controller")[0].log.read_text()
    assert "serves another model than the controller's" in log
