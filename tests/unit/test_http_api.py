"""The OpenAI-compatible HTTP API (controller/http_api.py) over an in-process round loop (the tiny model's
drafter and verifier, an in-memory store), through httpx's ASGI transport: the responses' shapes, greedy
output equal to transformers', streaming chunks adding up to the non-streaming text, stop strings, n,
usage and the speculation extension, chat templates, auth, and errors with their HTTP statuses."""

import asyncio
import json
import logging

import httpx
import pytest
import torch
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from controller.chat_template import ChatTemplate
from controller.discovery import StaticDiscovery
from controller.http_api import OpenAIFrontEnd, http_error
from controller.round_loop import RoundLoop
from controller.routing import Router
from controller.state_store import MemoryStateStore
from controller.text import TextCodec
from eesd.errors import InvalidArgument, ResourceExhausted, Unavailable
from eesd.params import PolicyParams
from serving import logs
from serving.security import Tokens
from tests.conftest import hf_greedy
from tests.openai_helpers import words
from tests.unit.test_round_loop_repairs import InProcessNodes, wipe

MODEL = "tiny"
PROMPT = [5, 9, 33, 71, 2, 140, 7]


def front_end(model, nodes, tokens=None, verifiers="v1:1", chat=True, policy="fixed") -> OpenAIFrontEnd:
    for node in nodes.values():
        wipe(node)
    router = Router(StaticDiscovery("d1:1"), StaticDiscovery(verifiers), down_s=60.0)
    codec = TextCodec(model / "tokenizer.json")
    loop = RoundLoop(
        MemoryStateStore(),
        router,
        InProcessNodes(nodes, lambda r, n: None),
        frozenset({2}),
        vocab_size=384,
        admission_wait_s=0.3,
        context=512,
        codec=codec,
    )
    front = OpenAIFrontEnd(
        loop,
        codec,
        ChatTemplate.of_model(str(model)) if chat else None,
        MODEL,
        PolicyParams(policy, 3),
        256,
        400,
        1 << 20,
        context=512,
        tokens=tokens,
    )
    front.ready = True
    return front


def call(front: OpenAIFrontEnd, method: str, path: str, body: dict | None = None, headers=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=front.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def events(response: httpx.Response) -> list:
    """The data of a server-sent event stream, [DONE] last."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_greedy_completion_of_token_ids_is_transformers_greedy(model, nodes):
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    response = call(front, "POST", "/v1/completions", body)
    assert response.status_code == 200, response.text
    out = response.json()
    expected = hf_greedy(model, PROMPT, 20)
    assert out["object"] == "text_completion" and out["model"] == MODEL
    (choice,) = out["choices"]
    # The text goes on from the prompt's: prompt + completion reads as the whole sequence does.
    assert choice["text"] == " " + words(expected) and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 20, "total_tokens": len(PROMPT) + 20}
    spec = out["speculation"]
    assert spec["policy"] == "fixed" and spec["rounds"] >= 1 and spec["mean_accepted_tokens"] == 20 / spec["rounds"]


def test_streaming_chunks_add_up_to_the_non_streaming_text_with_usage_last(model, nodes):
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": words(PROMPT), "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = call(front, "POST", "/v1/completions", body).json()
    streamed = call(
        front, "POST", "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.status_code == 200
    chunks = events(streamed)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"] and usage["speculation"]["rounds"] >= 1
    texts = [c["choices"][0]["text"] for c in chunks[:-2]]
    assert len(texts) > 2  # one chunk per round, not one at the end
    assert "".join(texts) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]][-1] == "length"


def test_chat_completion_renders_the_checkpoints_template_and_streams_the_same_text(model, nodes):
    front = front_end(model, nodes)
    messages = [
        {"role": "system", "content": "w10 w11"},
        {"role": "user", "content": [{"type": "text", "text": "w12"}]},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    out = call(front, "POST", "/v1/chat/completions", body).json()
    # The template's prompt: bos, each message as role word + content + separator, the assistant's turn.
    prompt = [1, 4, 10, 11, 3, 5, 12, 3, 6]
    assert out["object"] == "chat.completion" and out["usage"]["prompt_tokens"] == len(prompt)
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": " " + words(hf_greedy(model, prompt, 16))}
    chunks = events(call(front, "POST", "/v1/chat/completions", {**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks[:-1])
    assert content == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_text_before_it_and_n_gives_independent_sessions(model, nodes):
    front = front_end(model, nodes)
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    whole = call(front, "POST", "/v1/completions", base).json()["choices"][0]["text"]
    stop = whole.split(" ")[7]  # the 8th word: found across rounds with k_max 3
    cut = whole[: whole.index(stop)]
    for stream in (False, True):
        response = call(front, "POST", "/v1/completions", {**base, "stop": [stop, "w999"], "stream": stream, "n": 2})
        if stream:
            chunks = events(response)[:-1]
            texts = {0: "", 1: ""}
            for c in chunks:
                texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
            finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
            assert finishes == ["stop", "stop"]
            assert texts == {0: cut, 1: cut}
        else:
            out = response.json()
            assert [c["index"] for c in out["choices"]] == [0, 1]
            assert all(c["text"] == cut and c["finish_reason"] == "stop" for c in out["choices"])
            assert out["usage"]["prompt_tokens"] == len(PROMPT)  # the prompt counted once


def test_n_sampled_choices_with_a_seed_differ_and_reproduce(model, nodes):
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 3, "n": 3}
    first = [c["text"] for c in call(front, "POST", "/v1/completions", body).json()["choices"]]
    again = [c["text"] for c in call(front, "POST", "/v1/completions", body).json()["choices"]]
    assert first == again and len(set(first)) > 1


def test_models_and_health(model, nodes):
    front = front_end(model, nodes)
    listed = call(front, "GET", "/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL]
    assert listed["data"][0]["root"] == MODEL  # vllm bench serve reads it when not given --model
    assert call(front, "GET", "/health").status_code == 200
    front.ready = False
    assert call(front, "GET", "/health").status_code == 503


def test_bearer_tokens_are_checked_like_on_grpc(model, nodes):
    front = front_end(model, nodes, tokens=Tokens("s3cret,next"))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        refused = call(front, "POST", "/v1/completions", body, headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert call(front, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for token in ("s3cret", "next"):
        assert call(front, "POST", "/v1/completions", body, {"Authorization": f"Bearer {token}"}).status_code == 200
    assert call(front, "GET", "/health").status_code == 200  # probes need no token


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"model": "other", "prompt": "w5"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "temperature": 0.001}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "max_tokens": 257}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT * 80}, 400, "prompt"),  # over the prompt limit
        ("/v1/completions", {"model": MODEL, "prompt": [5, 384]}, 400, "prompt"),  # outside the vocabulary
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT * 50, "max_tokens": 256}, 400, "max_tokens"),  # context
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "logprobs": 1, "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "prompt_logprobs": 0}, 400, "prompt_logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "stop_token_ids": [400]}, 400, "stop_token_ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "presence_penalty": 1}, 400, "presence_penalty"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "n": 17}, 400, "n"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "policy": "psychic"}, 400, "policy"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "assistant", "content": "w5"}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "prompt_logprobs": 1},
            400,
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
    ],
)
def test_bad_requests_are_openai_errors_naming_the_field(model, nodes, path, body, status, param):
    response = call(front_end(model, nodes), "POST", path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] in ("invalid_request_error",)


def test_a_model_without_a_chat_template_is_a_clear_400(model, nodes):
    response = call(
        front_end(model, nodes, chat=False),
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "w5"}]},
    )
    assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]


def test_no_verifier_is_503_and_unknown_paths_are_404(model, nodes):
    front = front_end(model, nodes, verifiers="")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for stream in (False, True):
        response = call(front, "POST", "/v1/completions", {**body, "stream": stream})
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["type"] == "service_unavailable_error"
    assert call(front, "GET", "/v1/nothing").status_code == 404


def test_domain_errors_map_to_their_statuses_in_one_place():
    assert http_error(InvalidArgument("max_new_tokens", "must be <= 4"))[0] == 400
    assert http_error(InvalidArgument("max_new_tokens", "must be <= 4"))[1].param == "max_tokens"
    assert http_error(ResourceExhausted("no KV room"))[0] == 429
    assert http_error(Unavailable("no verifier is ready"))[0] == 503
    assert http_error(RuntimeError("boom"))[1].message == "internal error"


def test_echo_prepends_the_prompt_and_a_batch_of_prompts_gets_n_choices_each(model, nodes):
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": ["w5 w9", "w33 w71"], "max_tokens": 4, "temperature": 0, "n": 2, "echo": True}
    out = call(front, "POST", "/v1/completions", {**body, "ignore_eos": True}).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for c in out["choices"]:
        prompt = ["w5 w9", "w33 w71"][c["index"] // 2]
        expected = words(hf_greedy(model, [int(w[1:]) for w in prompt.split()], 4))
        assert c["text"] == prompt + " " + expected
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 16


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' fp32 logits at each generated position (greedy: the raw distribution)."""
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(-1)


@pytest.mark.parametrize("policy", ["fixed", "off"])
def test_completion_logprobs_are_the_models_in_openais_shape(model, nodes, policy):
    front = front_end(model, nodes, policy=policy)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    out = call(front, "POST", "/v1/completions", body).json()
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = [int(t.strip()[1:]) for t in lp["tokens"]]  # each token's text in context: " w<id>"
    assert tokens == hf_greedy(model, PROMPT, 12) and "".join(lp["tokens"]) == choice["text"]
    expected = reference_logprobs(model, PROMPT, tokens)
    for i, (token, value, top, offset) in enumerate(
        zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"], strict=True)
    ):
        assert abs(value - expected[i, tokens[i]].item()) < 1e-4
        assert choice["text"][offset : offset + len(token)] == token
        # The sampled token first, then the 3 most likely (greedy: the sampled one is the most likely).
        assert list(top)[0] == token and len(top) == 3
        assert [int(t.strip()[1:]) for t in top] == expected[i].topk(3).indices.tolist()
        assert all(abs(v - expected[i, int(t.strip()[1:])].item()) < 1e-4 for t, v in top.items())
    # Streamed: each chunk carries its round's tokens, and they add up to the whole response's.
    chunks = events(call(front, "POST", "/v1/completions", {**body, "stream": True}))[:-1]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(parts) > 1  # one per round, not one at the end
    streamed = {key: [x for part in parts for x in part[key]] for key in lp}
    assert streamed == lp
    plain = call(front, "POST", "/v1/completions", {**body, "logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["text"] == choice["text"]


def test_chat_logprobs_are_the_models_in_openais_shape(model, nodes):
    front = front_end(model, nodes)
    messages = [{"role": "user", "content": "w12 w13"}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = call(front, "POST", "/v1/chat/completions", body).json()
    (choice,) = out["choices"]
    content = choice["logprobs"]["content"]
    assert [set(entry) for entry in content] == [{"token", "logprob", "bytes", "top_logprobs"}] * 10
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    prompt = [1, 5, 12, 13, 3, 6]  # the template's rendering (see the chat test above)
    tokens = [int(entry["token"].strip()[1:]) for entry in content]
    assert tokens == hf_greedy(model, prompt, 10)
    expected = reference_logprobs(model, prompt, tokens)
    for i, entry in enumerate(content):
        assert abs(entry["logprob"] - expected[i, tokens[i]].item()) < 1e-4
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert [set(t) for t in top] == [{"token", "logprob", "bytes"}] * 2
        assert top[0]["token"] == entry["token"]  # greedy: the chosen token is the most likely
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert [int(t["token"].strip()[1:]) for t in top] == expected[i].topk(2).indices.tolist()
    chunks = events(call(front, "POST", "/v1/chat/completions", {**body, "stream": True}))[:-1]
    streamed = [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    # logprobs without top_logprobs: each token's own, no alternatives.
    own = call(front, "POST", "/v1/chat/completions", {**body, "top_logprobs": None}).json()
    assert [e["top_logprobs"] for e in own["choices"][0]["logprobs"]["content"]] == [[]] * 10
    assert [e["logprob"] for e in own["choices"][0]["logprobs"]["content"]] == [e["logprob"] for e in content]


def test_logprobs_end_with_the_tokens_at_a_stop_string(model, nodes):
    front = front_end(model, nodes)
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    whole = call(front, "POST", "/v1/completions", base).json()["choices"][0]
    stop = whole["text"].split(" ")[7]  # the 8th word: found across rounds with k_max 3
    for stream in (False, True):
        response = call(front, "POST", "/v1/completions", {**base, "stop": [stop], "stream": stream})
        if stream:
            chunks = events(response)[:-1]
            tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
        else:
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "stop"
            tokens = choice["logprobs"]["tokens"]
            assert [list(top) for top in choice["logprobs"]["top_logprobs"]] == [[t] for t in tokens]  # 0: own only
        # The token that completed the stop string is the last one: no logprob of a token after it.
        assert tokens == whole["logprobs"]["tokens"][:7] and tokens[-1] == " " + stop


def test_return_token_ids_gives_the_prompts_ids_once_and_each_chunks_tokens(model, nodes):
    """vLLM's return_token_ids: prompt_token_ids in the first chunk of a choice (the whole response: once),
    token_ids of each chunk, adding up to the model's greedy tokens."""
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = hf_greedy(model, PROMPT, 12)
    plain = call(front, "POST", "/v1/completions", body).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain  # only when asked
    whole = call(front, "POST", "/v1/completions", {**body, "return_token_ids": True}).json()["choices"][0]
    assert whole["token_ids"] == expected and whole["prompt_token_ids"] == PROMPT
    chunks = events(call(front, "POST", "/v1/completions", {**body, "return_token_ids": True, "stream": True}))
    parts = [c["choices"][0] for c in chunks[:-1]]
    assert [p.get("prompt_token_ids") for p in parts] == [PROMPT] + [None] * (len(parts) - 1)
    assert sum((p["token_ids"] for p in parts), []) == expected and all(p["token_ids"] for p in parts[:-1])
    assert parts[-1]["token_ids"] == [] and parts[-1]["finish_reason"] == "length"

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "w12"}], "max_tokens": 8, "temperature": 0}
    chat |= {"ignore_eos": True, "return_token_ids": True}
    prompt = [1, 5, 12, 3, 6]  # the template's: bos, the user's turn, the assistant's opened
    whole = call(front, "POST", "/v1/chat/completions", chat).json()
    assert whole["prompt_token_ids"] == prompt and whole["choices"][0]["token_ids"] == hf_greedy(model, prompt, 8)
    chunks = events(call(front, "POST", "/v1/chat/completions", {**chat, "stream": True}))[:-1]
    assert [c.get("prompt_token_ids") for c in chunks] == [prompt] + [None] * (len(chunks) - 1)
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == whole["choices"][0]["token_ids"]


TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def http_count(handler: str, method: str, status: str) -> float:
    labels = {"handler": handler, "method": method, "status": status}
    return REGISTRY.get_sample_value("eesd:http_requests_total", labels) or 0.0


def test_http_requests_get_the_access_line_span_and_metrics_an_rpc_gets(model, nodes, spans, caplog):
    front = front_end(model, nodes)
    counted = [("/v1/completions", "POST", "200"), ("/v1/completions", "POST", "404"), ("none", "GET", "404")]
    counted.append(("/health", "GET", "200"))
    before = [http_count(*labels) for labels in counted]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        out = call(front, "POST", "/v1/completions", body, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}).json()
        assert call(front, "POST", "/v1/completions", {**body, "model": "other"}).status_code == 404
        assert call(front, "GET", "/health").status_code == 200
        assert call(front, "GET", "/v1/nothing").status_code == 404

    assert [http_count(*labels) - b for labels, b in zip(counted, before, strict=True)] == [1, 1, 1, 1]
    lines = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]  # none for the probes' /health
    assert [(r.method, r.status, r.protocol) for r in lines] == [
        ("POST /v1/completions", "200", "http"),
        ("POST /v1/completions", "404", "http"),
        ("GET none", "404", "http"),
    ]
    line = lines[0]
    assert line.session == out["id"] + "-0" and line.finish_reason == "length" and line.policy == "fixed"
    assert (line.prompt_tokens, line.max_new_tokens, line.generated_tokens, line.streamed_tokens) == (7, 6, 6, 6)
    assert line.rounds == out["speculation"]["rounds"] and line.ttft_ms > 0 and line.duration_ms > 0

    served = [s for s in spans.get_finished_spans() if s.name == "POST /v1/completions"]
    assert [s.attributes["http.response.status_code"] for s in served] == [200, 404]
    ok, refused = served
    # The client's traceparent is the parent; the rounds of the request's session are spans of the same trace.
    assert f"{ok.context.trace_id:032x}" == TRACE_ID and f"{ok.parent.span_id:016x}" == PARENT_ID
    assert ok.attributes["eesd.generated_tokens"] == 6 and ok.attributes["http.route"] == "/v1/completions"
    rounds = [s for s in spans.get_finished_spans() if s.name == "eesd.round"]
    assert len(rounds) == out["speculation"]["rounds"] and {s.context.trace_id for s in rounds} == {ok.context.trace_id}
    # A 4xx is the client's error: not the server span's ERROR (OpenTelemetry's HTTP convention).
    assert refused.parent is None and refused.status.status_code == StatusCode.UNSET


def test_a_client_that_hangs_up_mid_stream_is_a_499(model, nodes, caplog):
    """Starlette ends a stream whose client went away (http.disconnect): the request's access line and metrics
    say 499 (tests/e2e/test_http_api.py checks that its session then ends failed CANCELLED)."""
    front = front_end(model, nodes)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    before = http_count("/v1/completions", "POST", "499")
    first_chunk = asyncio.Event()
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        asyncio.run(front.app()(scope, receive, send))
    assert sent[0]["status"] == 200 and not any(m["type"] == "http.response.body" and not m["more_body"] for m in sent)
    assert http_count("/v1/completions", "POST", "499") - before == 1
    (line,) = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert line.status == "499" and line.method == "POST /v1/completions"
