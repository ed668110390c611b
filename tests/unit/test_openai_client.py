"""The official `openai` Python package against the OpenAI-compatible HTTP API (controller/http_api.py),
served by uvicorn on a loopback port over an in-process round loop (the tiny model's drafter and verifier):
models, completions and chat completions, streaming with usage, log probabilities, and errors parsed as
the package's own error classes (400 naming the field, 401, 404 for an unknown model)."""

import asyncio
from collections.abc import Awaitable, Callable

import openai
from openai import AsyncOpenAI

from controller.http_api import HttpServer
from serving.local_stack import free_port
from serving.security import Tokens
from tests.conftest import hf_greedy
from tests.openai_helpers import words
from tests.unit.test_http_api import MODEL, PROMPT, front_end

TOKEN = "openai-s3cret"
CHAT_PROMPT = [1, 5, 12, 13, 3, 6]  # the tiny chat template's rendering of one user message "w12 w13"


def served(model, nodes, scenario: Callable[[AsyncOpenAI], Awaitable]):
    """Runs `scenario` with an AsyncOpenAI client of the front end on a real HTTP port (bearer auth on)."""

    async def go():
        port = free_port()
        server = HttpServer(front_end(model, nodes, tokens=Tokens(TOKEN)), "127.0.0.1", port, grace_s=1.0)
        await server.start()
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=60)
        try:
            return await scenario(client)
        finally:
            await client.close()
            await server.stop()

    return asyncio.run(go())


def test_models_and_a_greedy_completion_with_logprobs(model, nodes):
    async def scenario(client: AsyncOpenAI):
        listed = await client.models.list()
        completion = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
        )
        return listed, completion

    listed, completion = served(model, nodes, scenario)
    assert [m.id for m in listed.data] == [MODEL]
    (choice,) = completion.choices
    expected = hf_greedy(model, PROMPT, 12)
    assert choice.text == " " + words(expected) and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens == len(PROMPT)
    logprobs = choice.logprobs
    assert logprobs.tokens == [f" w{t}" for t in expected] and len(logprobs.token_logprobs) == 12
    assert logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert all(list(top)[0] == token for top, token in zip(logprobs.top_logprobs, logprobs.tokens, strict=True))


def test_chat_completion_whole_and_streamed_with_usage_and_logprobs(model, nodes):
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "w12 w13"}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )

    async def scenario(client: AsyncOpenAI):
        whole = await client.chat.completions.create(**request)
        stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        return whole, chunks

    whole, chunks = served(model, nodes, scenario)
    (choice,) = whole.choices
    expected = hf_greedy(model, CHAT_PROMPT, 10)
    assert choice.message.role == "assistant" and choice.message.content == " " + words(expected)
    content = choice.logprobs.content
    assert [c.token for c in content] == [f" w{t}" for t in expected]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob for c in content)
    # Streamed: the role first, the content round by round, the finish reason, then usage alone.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == len(CHAT_PROMPT)
    deltas = [c.choices[0].delta.content or "" for c in chunks[:-1]]
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    streamed = [lp for c in chunks[:-1] if c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert streamed == content


def test_a_streamed_completion_adds_up(model, nodes):
    async def scenario(client: AsyncOpenAI):
        stream = await client.completions.create(
            model=MODEL,
            prompt=words(PROMPT),
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        return [chunk async for chunk in stream]

    chunks = served(model, nodes, scenario)
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []
    assert "".join(c.choices[0].text for c in chunks[:-1]) == " " + words(hf_greedy(model, PROMPT, 16))


def test_errors_are_the_packages_error_classes(model, nodes):
    async def scenario(client: AsyncOpenAI):
        errors = []
        for call in (
            lambda c: c.completions.create(model=MODEL, prompt="w5", temperature=0.001),
            lambda c: c.completions.create(model="other", prompt="w5"),
            lambda c: c.chat.completions.create(model="other", messages=[{"role": "user", "content": "w5"}]),
            lambda c: c.with_options(api_key="wrong").models.list(),
        ):
            try:
                await call(client)
            except openai.APIStatusError as error:
                errors.append(error)
        return errors

    bad, unknown, unknown_chat, unauthenticated = served(model, nodes, scenario)
    assert isinstance(bad, openai.BadRequestError) and bad.status_code == 400
    assert bad.param == "temperature" and bad.type == "invalid_request_error" and "temperature" in bad.message
    for error in (unknown, unknown_chat):
        assert isinstance(error, openai.NotFoundError) and error.status_code == 404
        assert error.code == "model_not_found" and error.param == "model"
    assert isinstance(unauthenticated, openai.AuthenticationError) and unauthenticated.code == "invalid_api_key"
