"""Resuming a Generate stream that broke mid-way, through both clients (sync and asyncio) on the same fake."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from client_fakes import Drop, Server, expected_tokens, rounds_of, token_text
from eesd_client import (
    AlreadyExistsError,
    AsyncEesdClient,
    CancelledError,
    DeadlineExceededError,
    EesdClient,
    EesdError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    InvalidArgumentError,
    ProtocolError,
    RetryPolicy,
    TokenLogprob,
    UnavailableError,
)
from eesd_client._convert import ResultBuilder, generate_request_to_proto

from eesd_proto.eesd.v1 import common_pb2, controller_pb2

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


@dataclass
class Outcome:
    """What a caller of `generate` saw: the chunks, then the result or the error, and the stream's counters."""

    chunks: list[GenerationChunk] = field(default_factory=list)
    result: GenerationResult | None = None
    error: EesdError | None = None
    attempts: int = 0
    resumes: int = 0
    elapsed_s: float = 0.0


Generate = Callable[..., Outcome]


def _generate_sync(server: Server, prompt: str, retry: RetryPolicy, timeout: float, **options: object) -> Outcome:
    outcome = Outcome()
    with EesdClient(server.address, retry=retry, timeout=timeout) as client:
        stream = client.generate(prompt, **options)
        try:
            for chunk in stream:
                outcome.chunks.append(chunk)
            outcome.result = stream.result()
        except EesdError as error:
            outcome.error = error
            with pytest.raises(type(error)):  # the failure sticks to the stream
                stream.result()
        outcome.attempts, outcome.resumes = stream.attempts, stream.resumes
    return outcome


async def _generate_async(
    server: Server, prompt: str, retry: RetryPolicy, timeout: float, **options: object
) -> Outcome:
    outcome = Outcome()
    async with AsyncEesdClient(server.address, retry=retry, timeout=timeout) as client:
        stream = client.generate(prompt, **options)
        try:
            async for chunk in stream:
                outcome.chunks.append(chunk)
            outcome.result = await stream.result()
        except EesdError as error:
            outcome.error = error
            with pytest.raises(type(error)):
                await stream.result()
        outcome.attempts, outcome.resumes = stream.attempts, stream.resumes
    return outcome


@pytest.fixture(params=["sync", "async"])
def generate(request: pytest.FixtureRequest, controller: Server) -> Generate:
    """Runs one generation through EesdClient or AsyncEesdClient against `controller`."""

    def run(
        prompt: str = "hi", *, retry: RetryPolicy = FAST_RETRY, timeout: float = 10.0, **options: object
    ) -> Outcome:
        start = time.monotonic()
        if request.param == "sync":
            outcome = _generate_sync(controller, prompt, retry, timeout, **options)
        else:
            outcome = asyncio.run(_generate_async(controller, prompt, retry, timeout, **options))
        outcome.elapsed_s = time.monotonic() - start
        return outcome

    return run


def without_session(outcome: Outcome) -> tuple[list[GenerationChunk], GenerationResult]:
    """The chunks and result with the session id blanked, to compare two sessions' streams."""
    assert outcome.error is None and outcome.result is not None
    chunks = [dataclasses.replace(c, session_id="") for c in outcome.chunks]
    return chunks, dataclasses.replace(outcome.result, session_id="")


def test_a_stream_dropped_mid_way_resumes_as_if_uninterrupted(controller: Server, generate: Generate) -> None:
    reference = generate(max_new_tokens=10, temperature=0.7, top_k=5, seed=3, policy="fixed", k_max=4)
    assert reference.attempts == 1 and reference.resumes == 0
    controller.fake.behaviour.drops = [Drop(after_messages=2)]  # rounds 0 and 1 (3 tokens) arrived
    outcome = generate(max_new_tokens=10, temperature=0.7, top_k=5, seed=3, policy="fixed", k_max=4)

    # Nothing was committed after the drop, so the catch-up chunk is empty and the caller sees the same
    # chunks, result and statistics as without the drop.
    assert without_session(outcome) == without_session(reference)
    assert outcome.result is not None and outcome.result.session_id == "session-2"
    assert outcome.result.token_ids == tuple(expected_tokens(10))
    assert outcome.attempts == 2 and outcome.resumes == 1
    assert not any(c.resumed for c in outcome.chunks)

    first, resume = controller.fake.requests[1:]
    assert first.session_id == "" and first.received_tokens == 0
    assert resume.session_id == "session-2" and resume.received_tokens == 3
    # Otherwise the very same request: the server matches it with the session's (seed included).
    resume.session_id, resume.received_tokens = "", 0
    assert resume == first


def test_rounds_missed_while_down_arrive_in_one_catch_up_chunk(controller: Server, generate: Generate) -> None:
    reference = generate(max_new_tokens=12)
    # Round 0 arrives; rounds 1 and 2 are committed but lost with the stream.
    controller.fake.behaviour.drops = [Drop(after_messages=1, lost_rounds=2)]
    outcome = generate(max_new_tokens=12)

    assert [c.token_ids for c in outcome.chunks] == [
        (100,),
        (101, 102, 103, 104, 105),
        (106,),
        (107, 108),
        (109, 110, 111),
    ]
    assert [c.resumed for c in outcome.chunks] == [False, True, False, False, False]
    assert outcome.chunks[1].text == "".join(token_text(t) for t in range(101, 106))
    assert outcome.resumes == 1 and controller.fake.requests[-1].received_tokens == 1

    ref_chunks, ref_result = without_session(reference)
    _, result = without_session(outcome)
    assert (result.token_ids, result.text, result.stats) == (ref_result.token_ids, ref_result.text, ref_result.stats)
    # The catch-up chunk is no round of its own: `rounds` holds the rounds streamed live, once each.
    assert result.rounds == tuple(c.stats for i, c in enumerate(ref_chunks) if i not in (1, 2))


def test_each_resume_that_brings_tokens_restarts_the_attempt_count(controller: Server, generate: Generate) -> None:
    # Five drops with max_attempts=2: every resume brings new tokens, so none exhausts the policy.
    controller.fake.behaviour.drops = [Drop(1), Drop(2), Drop(2, lost_rounds=1), Drop(2), Drop(2)]
    outcome = generate(max_new_tokens=30, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    assert outcome.error is None and outcome.result is not None
    assert outcome.result.token_ids == tuple(expected_tokens(30))
    assert outcome.attempts == 6 and outcome.resumes == 5
    assert [r.received_tokens for r in controller.fake.requests] == [0, 1, 3, 6, 9, 12]


def test_an_ended_session_answers_with_its_catch_up_and_summary(controller: Server, generate: Generate) -> None:
    # Every remaining round is committed while the stream is down: the resume gets them and the summary.
    controller.fake.behaviour.drops = [Drop(after_messages=1, lost_rounds=100)]
    outcome = generate(max_new_tokens=8)
    assert outcome.result is not None and outcome.result.token_ids == tuple(expected_tokens(8))
    assert [c.token_ids for c in outcome.chunks] == [(100,), (101, 102, 103, 104, 105, 106, 107)]
    assert outcome.result.stats.speculation.rounds == len(rounds_of(8)) and outcome.resumes == 1


def test_an_error_after_the_summary_loses_nothing(controller: Server, generate: Generate) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=len(rounds_of(4)) + 1)]
    outcome = generate(max_new_tokens=4)
    assert outcome.result is not None and outcome.result.token_ids == tuple(expected_tokens(4))
    assert outcome.attempts == 1


@pytest.mark.parametrize("lost_rounds", [0, 1])
def test_a_retry_with_a_chosen_session_id_resumes_it(controller: Server, generate: Generate, lost_rounds: int) -> None:
    # The first attempt created the session (and maybe committed a round), then failed before any response.
    controller.fake.behaviour.drops = [Drop(after_messages=0, lost_rounds=lost_rounds)]
    outcome = generate(max_new_tokens=6, session_id="mine")
    assert outcome.error is None and outcome.result is not None
    assert outcome.result.token_ids == tuple(expected_tokens(6)) and outcome.result.session_id == "mine"
    assert [(r.session_id, r.received_tokens) for r in controller.fake.requests] == [("mine", 0), ("mine", 0)]
    assert outcome.attempts == 2 and outcome.resumes == 0  # a retry before the first response
    assert [c.resumed for c in outcome.chunks] == [bool(lost_rounds), False, False]


def test_a_retry_without_a_chosen_session_id_is_a_fresh_request(controller: Server, generate: Generate) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=0)]
    outcome = generate(max_new_tokens=3)
    assert outcome.result is not None and outcome.result.session_id == "session-2"
    assert [(r.session_id, r.received_tokens) for r in controller.fake.requests] == [("", 0), ("", 0)]
    assert not any(c.resumed for c in outcome.chunks)


def test_a_used_session_id_with_another_request_is_not_retried(controller: Server, generate: Generate) -> None:
    assert generate(max_new_tokens=3, session_id="taken").error is None
    outcome = generate(max_new_tokens=4, session_id="taken")
    assert isinstance(outcome.error, AlreadyExistsError) and outcome.attempts == 1


@pytest.mark.parametrize(
    ("code", "error_type"),
    [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError), (grpc.StatusCode.INTERNAL, EesdError)],
)
def test_a_non_transient_error_mid_stream_is_not_resumed(
    controller: Server, generate: Generate, code: grpc.StatusCode, error_type: type[EesdError]
) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=2, code=code)]
    outcome = generate(max_new_tokens=10)
    assert isinstance(outcome.error, error_type) and outcome.error.code == code
    assert len(outcome.chunks) == 2 and outcome.attempts == 1 and outcome.resumes == 0


@pytest.mark.parametrize("retry", [RetryPolicy(resume=False), RetryPolicy(max_attempts=1)])
def test_resume_can_be_turned_off(controller: Server, generate: Generate, retry: RetryPolicy) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=1)]
    outcome = generate(max_new_tokens=10, retry=retry)
    assert isinstance(outcome.error, UnavailableError) and "controller lost" in outcome.error.message
    assert [c.token_ids for c in outcome.chunks] == [(100,)] and outcome.attempts == 1


def test_a_deadline_that_runs_out_while_resuming_surfaces(controller: Server, generate: Generate) -> None:
    # The stream breaks after one round, then every resume fails at once: backoff until the deadline.
    controller.fake.behaviour.drops = [Drop(after_messages=1)] + [Drop(after_messages=0)] * 1000
    patient = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.1)
    outcome = generate(max_new_tokens=10, retry=patient, timeout=0.8)
    assert isinstance(outcome.error, UnavailableError)
    assert outcome.elapsed_s < 2.0 and outcome.attempts > 3 and outcome.resumes == outcome.attempts - 1
    assert [c.token_ids for c in outcome.chunks] == [(100,)]


def test_a_deadline_that_runs_out_in_a_resumed_stream_surfaces(controller: Server, generate: Generate) -> None:
    controller.fake.behaviour.chunk_delay_s = 0.1
    controller.fake.behaviour.drops = [Drop(after_messages=2)]
    outcome = generate(max_new_tokens=40, timeout=0.6)
    assert isinstance(outcome.error, DeadlineExceededError)
    assert outcome.attempts == 2 and outcome.resumes == 1 and outcome.elapsed_s < 2.0
    tokens = [t for c in outcome.chunks for t in c.token_ids]
    assert tokens == expected_tokens(len(tokens)) and len(outcome.chunks) >= 3  # no duplicate, no gap


def test_cancel_during_the_backoff_ends_the_stream_at_once(controller: Server) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=1)]
    slow = RetryPolicy(initial_backoff_s=5.0, max_backoff_s=5.0, jitter=0.0)
    with EesdClient(controller.address, retry=slow, timeout=30) as client:
        stream = client.generate("hi", max_new_tokens=10)
        assert next(stream).token_ids == (100,)
        threading.Timer(0.2, stream.cancel).start()
        start = time.monotonic()
        with pytest.raises(CancelledError):
            next(stream)
    assert time.monotonic() - start < 2.0 and controller.fake.generate_attempts == 1


def test_a_stream_resuming_after_close_stops(controller: Server) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=1)]
    backoff = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=0.5, jitter=0.0)
    client = EesdClient(controller.address, retry=backoff, timeout=30)
    stream = client.generate("hi", max_new_tokens=10)
    assert next(stream).token_ids == (100,)
    threading.Timer(0.2, client.close).start()
    with pytest.raises(CancelledError, match="client was closed"):
        next(stream)
    assert controller.fake.generate_attempts == 1


def test_async_cancel_or_close_during_the_backoff_ends_the_stream(controller: Server) -> None:
    controller.fake.behaviour.drops = [Drop(after_messages=1), Drop(after_messages=1)]
    slow = RetryPolicy(initial_backoff_s=5.0, max_backoff_s=5.0, jitter=0.0)

    async def run() -> None:
        async with AsyncEesdClient(controller.address, retry=slow, timeout=30) as client:
            stream = client.generate("hi", max_new_tokens=10)
            assert (await anext(stream)).token_ids == (100,)
            asyncio.get_running_loop().call_later(0.2, stream.cancel)
            with pytest.raises(CancelledError):
                await anext(stream)
        fast = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=0.5, jitter=0.0)
        client = AsyncEesdClient(controller.address, retry=fast, timeout=30)
        stream = client.generate("hi", max_new_tokens=10)
        assert (await anext(stream)).token_ids == (100,)
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(client.close()))
        with pytest.raises(CancelledError, match="client was closed"):
            await anext(stream)

    start = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - start < 3.0 and controller.fake.generate_attempts == 2


def test_result_builder_counts_each_token_once_and_checks_the_session() -> None:
    def chunk(session_id: str, ids: list[int]) -> controller_pb2.GenerateResponse:
        return controller_pb2.GenerateResponse(
            session_id=session_id, chunk=controller_pb2.GenerationChunk(token_ids=ids, text="x" * len(ids))
        )

    builder = ResultBuilder("s")
    assert builder.session_id == "s" and not builder.streamed
    assert builder.add(chunk("s", [1, 2])) is not None
    assert builder.add(chunk("s", []), catch_up=True) is None  # nothing missed: nothing to yield
    caught_up = builder.add(chunk("s", [3]), catch_up=True)
    assert caught_up is not None and caught_up.resumed and builder.completion_tokens == 3
    with pytest.raises(ProtocolError, match="'other'"):
        builder.add(chunk("other", [4]))
    builder.add(controller_pb2.GenerateResponse(session_id="s", summary=controller_pb2.GenerationSummary()))
    result = builder.result()
    assert result.token_ids == (1, 2, 3) and result.text == "xxx" and len(result.rounds) == 1


def test_result_builder_keeps_the_logprobs_of_each_token() -> None:
    """Chunks carry one TokenLogprob per token when the request asked; a resumed stream's catch-up chunk
    carries none (the server does not store them), so its tokens get None in the result."""

    def chunk(ids: list[int]) -> controller_pb2.GenerateResponse:
        logprobs = [
            common_pb2.TokenLogprob(token_id=t, logprob=-0.5, top=[common_pb2.TopLogprob(token_id=t, logprob=-0.5)])
            for t in ids
        ]
        message = controller_pb2.GenerationChunk(token_ids=ids, text="x", logprobs=logprobs)
        return controller_pb2.GenerateResponse(session_id="s", chunk=message)

    builder = ResultBuilder("s", logprobs=True)
    first = builder.add(chunk([1, 2]))
    assert first.logprobs == (TokenLogprob(1, -0.5, ((1, -0.5),)), TokenLogprob(2, -0.5, ((2, -0.5),)))
    caught_up = builder.add(controller_pb2.GenerateResponse(session_id="s", chunk={"token_ids": [3]}), catch_up=True)
    assert caught_up.logprobs is None
    broken = controller_pb2.GenerateResponse(session_id="s", chunk={"token_ids": [4, 5], "logprobs": [{"token_id": 4}]})
    with pytest.raises(ProtocolError, match="1 log probabilities for 2 tokens"):
        builder.add(broken)
    builder.add(controller_pb2.GenerateResponse(session_id="s", summary=controller_pb2.GenerationSummary()))
    assert builder.result().logprobs == (*first.logprobs, None)
    plain = ResultBuilder("s")
    assert plain.add(chunk([1])).logprobs is None
    plain.add(controller_pb2.GenerateResponse(session_id="s", summary=controller_pb2.GenerationSummary()))
    assert plain.result().logprobs is None


def test_the_request_carries_top_logprobs_only_when_set() -> None:
    assert generate_request_to_proto(GenerationRequest("hi", top_logprobs=0)).top_logprobs == 0
    assert generate_request_to_proto(GenerationRequest("hi", top_logprobs=0)).HasField("top_logprobs")
    assert not generate_request_to_proto(GenerationRequest("hi")).HasField("top_logprobs")
