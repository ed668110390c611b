"""The OpenAI-compatible HTTP API of a real stack (controller, drafter, verifier processes; the controller's
--http-port): greedy output through HTTP equals transformers' greedy decoding, a streamed chat completion
arrives round by round and adds up to the non-streaming one, a stop string ends the text, bearer auth,
and the controller stops cleanly on SIGTERM with its HTTP port."""

import json
import signal
import time

import grpc
import httpx
import pytest
import torch
from eesd_client import EesdClient, FinishReason, SessionState
from transformers import AutoModelForCausalLM

from serving.local_stack import free_port
from tests.e2e.helpers import log_tails, oracle, start_stack, stop_stack
from tests.openai_helpers import servable_model, words

PROMPT = [11, 12, 13, 14]
TOKEN = "http-s3cret"


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    model = servable_model(tiny_models["llama"], tmp_path_factory.mktemp("http") / "tiny-chat")
    port = free_port()
    controller_args = ("--http-port", str(port), "--auth-token", TOKEN, "--default-policy", "fixed", "--k-max", "3")
    stack = start_stack(model, 1, tmp_path_factory.mktemp("http-logs"), controller_args=controller_args)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
    )
    try:
        yield stack, client, model
    finally:
        client.close()
        stop_stack(stack)


def sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_models_and_auth(stack):
    _, client, _ = stack
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-chat"]  # the folder's name
    refused = httpx.post(f"{client.base_url}/v1/completions", json={"model": "tiny-chat", "prompt": "w5"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_greedy_completion_through_http_is_transformers_greedy(stack):
    _, client, model = stack
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == " " + words(oracle(model, PROMPT, 24))  # goes on from the prompt
    assert out["usage"]["completion_tokens"] == 24 and out["speculation"]["policy"] == "fixed"


def test_a_streamed_chat_completion_arrives_round_by_round_and_adds_up(stack):
    _, client, model = stack
    messages = [{"role": "user", "content": "w20 w21 w22"}]
    body = {"model": "tiny-chat", "messages": messages, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    expected = " " + words(oracle(model, [1, 5, 20, 21, 22, 3, 6], 20))  # after the template's prompt
    assert whole["choices"][0]["message"]["content"] == expected
    streaming = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=streaming) as response:
        assert response.status_code == 200
        chunks = sse(response.iter_lines())
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == whole["usage"]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks[:-2]]
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == expected


def test_a_stop_string_across_rounds_ends_the_text_before_it(stack):
    _, client, model = stack
    generated = oracle(model, PROMPT, 30)
    stop = f"w{generated[8]} w{generated[9]}"  # two words: they may well sit in two rounds
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/completions", json={**body, "stop": stop}).json()
    whole = " " + words(generated)
    assert out["choices"][0] == {
        "index": 0,
        "text": whole[: whole.index(stop)],
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_stop_strings_and_ids_through_the_grpc_sdk(stack):
    """The same stop conditions on the gRPC API: the SDK's stop= and stop_token_ids=."""
    stack, _, model = stack
    generated = list(oracle(model, PROMPT, 30))
    whole = " " + words(generated)
    stop = f"w{generated[8]} w{generated[9]}"
    with EesdClient(stack.controller_address, timeout=120, auth_token=TOKEN) as client:
        by_text = client.generate_text(PROMPT, max_new_tokens=30, stop_on_eos=False, stop=[stop, "w999 w998"])
        by_id = client.generate_text(PROMPT, max_new_tokens=30, stop_on_eos=False, stop_token_ids=[generated[5]])
    assert by_text.finish_reason == FinishReason.STOP and by_text.text == whole[: whole.index(stop)]
    assert list(by_text.token_ids) == generated[: len(by_text.token_ids)]
    first = generated.index(generated[5])
    assert by_id.finish_reason == FinishReason.STOP and list(by_id.token_ids) == generated[: first + 1]


@pytest.mark.parametrize("policy", ["fixed", "off"])
def test_logprobs_through_the_grpc_sdk_and_http_are_the_models(stack, policy):
    """Over the real protocol (drafter relaying the verifier's verdict, or verifier-only Verify calls): each
    token's log p is transformers' log_softmax at its position, and HTTP shows the same numbers."""
    stack, client, model = stack
    with EesdClient(stack.controller_address, timeout=120, auth_token=TOKEN) as sdk:
        result = sdk.generate_text(PROMPT, max_new_tokens=16, stop_on_eos=False, policy=policy, top_logprobs=3)
    tokens = list(result.token_ids)
    assert tokens == list(oracle(model, PROMPT, 16)) and len(result.logprobs) == 16
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1].log_softmax(-1)
    for i, lp in enumerate(result.logprobs):
        assert lp.token_id == tokens[i] and abs(lp.logprob - expected[i, tokens[i]].item()) < 1e-4
        assert [t for t, _ in lp.top] == expected[i].topk(3).indices.tolist()
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/completions", json={**body, "logprobs": 3, "policy": policy}).json()
    assert out["choices"][0]["logprobs"]["token_logprobs"] == [lp.logprob for lp in result.logprobs]


def test_a_client_that_hangs_up_ends_its_session_resumably(stack):
    """A streaming client gone mid-way: its session stops, failed CANCELLED as a broken gRPC stream leaves it."""
    stack, client, _ = stack
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    session_id = json.loads(first[len("data: ") :])["id"] + "-0"
    with EesdClient(stack.controller_address, timeout=60, auth_token=TOKEN) as sdk:
        deadline = time.monotonic() + 30
        while (info := sdk.get_session(session_id)).state == SessionState.ACTIVE and time.monotonic() < deadline:
            time.sleep(0.1)
    assert info.state == SessionState.FAILED and info.error.code == grpc.StatusCode.CANCELLED, info
    assert info.usage.completion_tokens < 480


def test_sigterm_stops_the_controller_and_its_http_port(tiny_models, tmp_path):
    model = servable_model(tiny_models["llama"], tmp_path / "tiny-chat")
    port = free_port()
    stack = start_stack(model, 1, tmp_path / "logs", controller_args=("--http-port", str(port)))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        (controller,) = stack.by_role("controller")
        controller.process.send_signal(signal.SIGTERM)
        assert controller.process.wait(timeout=60) == 0, log_tails(stack)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        stop_stack(stack)
