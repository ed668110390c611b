"""AsyncEesdClient against a real gRPC server on loopback (each test runs its own event loop)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from client_fakes import Server, expected_tokens
from eesd_client import (
    AsyncEesdClient,
    CancelledError,
    DeadlineExceededError,
    FinishReason,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    SessionState,
    UnauthenticatedError,
)

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def client_for(server: Server, **kwargs: object) -> AsyncEesdClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout", 10.0)
    return AsyncEesdClient(server.address, **kwargs)


def test_generate_streams_chunks_then_final_stats(controller: Server) -> None:
    async def run() -> None:
        async with client_for(controller) as client:
            stream = client.generate("hi", max_new_tokens=6, temperature=0.5, seed=7)
            chunks = [chunk async for chunk in stream]
            result = await stream.result()
        assert [c.token_ids for c in chunks] == [(100,), (101, 102), (103, 104, 105)]
        assert result.token_ids == tuple(expected_tokens(6)) and result.text.startswith("t100 t101 ")
        assert result.finish_reason is FinishReason.LENGTH and result.stats.speculation.rounds == 3
        assert stream.session_id == result.session_id == "session-1"

    asyncio.run(run())
    assert controller.fake.requests[0].sampling.seed == 7


def test_retries_unavailable_before_the_first_token(controller: Server) -> None:
    controller.fake.behaviour.unavailable_times = 3

    async def run() -> int:
        async with client_for(controller) as client:
            stream = client.generate("hi", max_new_tokens=2)
            assert (await stream.result()).token_ids == (100, 101)
            return stream.attempts

    assert asyncio.run(run()) == 4
    assert controller.fake.generate_attempts == 4


def test_deadline_and_error_mapping(controller: Server) -> None:
    async def run() -> None:
        async with client_for(controller) as client:
            controller.fake.behaviour.chunk_delay_s = 0.2
            with pytest.raises(DeadlineExceededError):
                await client.generate_text("hi", max_new_tokens=30, timeout=0.3)
            controller.fake.behaviour.chunk_delay_s = 0.0
            with pytest.raises(NotFoundError):
                await client.get_session("missing")
            controller.fake.behaviour.fail_code = grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidArgumentError, match="told to fail"):
                await client.generate_text("hi", max_new_tokens=3)

    asyncio.run(run())


def test_local_cancel_ends_the_stream(controller: Server) -> None:
    async def run() -> None:
        async with client_for(controller) as client:
            stream = client.generate("hi", max_new_tokens=50)
            await anext(stream)
            stream.cancel()
            with pytest.raises(CancelledError):
                await stream.result()

    asyncio.run(run())


def test_cancel_get_session_and_auth(controller: Server) -> None:
    controller.fake.behaviour.required_token = "tok"

    async def run() -> None:
        async with client_for(controller, auth_token="tok") as client:
            result = await client.generate_text([5, 6], max_new_tokens=3, session_id="a1")
            assert await client.cancel(result.session_id) is SessionState.FINISHED
            info = await client.get_session("a1", include_token_ids=True)
            assert info.usage.prompt_tokens == 2 and info.committed_token_ids[-3:] == (100, 101, 102)
        async with client_for(controller) as anonymous:
            with pytest.raises(UnauthenticatedError):
                await anonymous.get_session("a1")

    asyncio.run(run())
    assert controller.fake.metadata[0]["authorization"] == "Bearer tok"
