"""EesdClient against a real gRPC server on loopback."""

from __future__ import annotations

import grpc
import pytest
from client_fakes import PROMPT_IDS, Server, expected_tokens, token_text
from eesd_client import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    EesdClient,
    EesdError,
    FinishReason,
    InvalidArgumentError,
    NotFoundError,
    Policy,
    ProtocolError,
    ResourceExhaustedError,
    RetryPolicy,
    SessionError,
    SessionState,
    UnauthenticatedError,
    UnavailableError,
)

from eesd_proto.eesd.v1 import controller_pb2

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def client_for(server: Server, **kwargs: object) -> EesdClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout", 10.0)
    return EesdClient(server.address, **kwargs)


def test_generate_streams_chunks_then_final_stats(controller: Server) -> None:
    with client_for(controller) as client:
        stream = client.generate(
            "Once upon a time",
            max_new_tokens=7,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            seed=1234,
            policy=Policy.CALIBRATION_TS,
            policy_options={"buckets": 8},
            k_max=6,
            session_id="s-1",
            stop_on_eos=False,
        )
        chunks = list(stream)
        result = stream.result()

    assert [c.token_ids for c in chunks] == [(100,), (101, 102), (103, 104, 105), (106,)]
    assert [c.round for c in chunks] == [0, 1, 2, 3]
    assert chunks[1].text == "t101 t102 " and chunks[1].stats.accepted == 1 and chunks[1].stats.committed == 2
    assert stream.session_id == "s-1" and stream.attempts == 1
    assert result.token_ids == tuple(expected_tokens(7))
    assert result.text == "".join(token_text(t) for t in expected_tokens(7))
    assert result.finish_reason is FinishReason.LENGTH
    assert result.stats.usage.completion_tokens == 7
    assert result.stats.speculation.rounds == 4
    assert result.stats.speculation.k_histogram == {2: 2, 3: 1, 4: 1}
    assert result.stats.speculation.mean_accepted_tokens == pytest.approx(7 / 4)
    assert result.stats.speculation.policy == "calibration-ts"
    assert result.stats.time_split.verify_ms == pytest.approx(8.0)
    assert len(result.rounds) == 4

    request = controller.fake.requests[0]
    assert request.prompt_text == "Once upon a time" and request.max_new_tokens == 7
    assert request.sampling.temperature == pytest.approx(0.7) and request.sampling.top_k == 40
    assert request.sampling.top_p == pytest.approx(0.9) and request.sampling.seed == 1234
    assert request.policy.name == "calibration-ts" and dict(request.policy.options) == {"buckets": 8.0}
    assert request.policy.k_max == 6 and request.session_id == "s-1" and request.ignore_eos


def test_generate_text_with_prompt_ids_and_defaults(controller: Server) -> None:
    with client_for(controller) as client:
        result = client.generate_text(list(PROMPT_IDS), max_new_tokens=3)
    assert result.token_ids == (100, 101, 102)
    assert result.stats.usage.prompt_tokens == len(PROMPT_IDS)
    request = controller.fake.requests[0]
    assert tuple(request.prompt_ids.ids) == PROMPT_IDS
    # Defaults: greedy, server-chosen policy and k_max, stop at EOS, no seed.
    assert request.sampling.temperature == 0 and not request.sampling.HasField("seed")
    assert request.policy.name == "" and not request.policy.HasField("k_max") and not request.ignore_eos


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retries_unavailable_before_the_first_token(controller: Server, code: grpc.StatusCode) -> None:
    controller.fake.behaviour.unavailable_times = 2
    controller.fake.behaviour.transient_code = code
    with client_for(controller) as client:
        stream = client.generate("hi", max_new_tokens=4)
        result = stream.result()
    assert result.token_ids == tuple(expected_tokens(4))
    assert controller.fake.generate_attempts == 3 and stream.attempts == 3


@pytest.mark.parametrize(
    ("code", "error_type"),
    [(grpc.StatusCode.UNAVAILABLE, UnavailableError), (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError)],
)
def test_gives_up_after_max_attempts(controller: Server, code: grpc.StatusCode, error_type: type) -> None:
    controller.fake.behaviour.unavailable_times = 100
    controller.fake.behaviour.transient_code = code
    with client_for(controller, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(error_type, match="warming up"):
            client.generate_text("hi", max_new_tokens=4)
    assert controller.fake.generate_attempts == 3


def test_deadline_covers_the_whole_stream(controller: Server) -> None:
    controller.fake.behaviour.chunk_delay_s = 0.2
    with client_for(controller) as client:
        with pytest.raises(DeadlineExceededError):
            client.generate_text("hi", max_new_tokens=30, timeout=0.3)
    assert controller.fake.generate_attempts == 1


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.DATA_LOSS, EesdError),
    ],
)
def test_status_codes_map_to_typed_errors_without_retry(
    controller: Server, code: grpc.StatusCode, error_type: type[EesdError]
) -> None:
    controller.fake.behaviour.fail_code = code
    with client_for(controller) as client:
        with pytest.raises(error_type) as raised:
            client.generate_text("hi", max_new_tokens=2)
        with pytest.raises(error_type):
            client.get_session("any")
    assert raised.value.code == code and "told to fail" in raised.value.message
    assert controller.fake.generate_attempts == 1


def test_invalid_requests_fail_before_any_call(controller: Server) -> None:
    with client_for(controller) as client:
        for prompt, options in [
            ("", {}),
            ([], {}),
            ([1, -2], {}),
            ("hi", {"max_new_tokens": 0}),
            ("hi", {"temperature": -1.0}),
            ("hi", {"top_p": 0.0}),
            ("hi", {"k_max": -1}),
            ("hi", {"seed": -1}),
            ("hi", {"top_logprobs": 21}),
            ("hi", {"top_logprobs": -1}),
        ]:
            with pytest.raises(InvalidArgumentError):
                client.generate(prompt, **options)
        with pytest.raises(InvalidArgumentError):
            client.cancel("")
    assert controller.fake.generate_attempts == 0


def test_stream_without_summary_is_a_protocol_error(controller: Server) -> None:
    controller.fake.behaviour.omit_summary = True
    with client_for(controller) as client:
        with pytest.raises(ProtocolError, match="without a summary"):
            client.generate_text("hi", max_new_tokens=2)


def test_local_cancel_ends_the_stream(controller: Server) -> None:
    with client_for(controller) as client:
        stream = client.generate("hi", max_new_tokens=50)
        next(stream)
        stream.cancel()
        with pytest.raises(CancelledError):
            list(stream)


def test_cancel_and_get_session(controller: Server) -> None:
    controller.fake.sessions["live"] = controller_pb2.Session(
        session_id="live", state=controller_pb2.SESSION_STATE_ACTIVE
    )
    with client_for(controller) as client:
        assert client.cancel("live") is SessionState.CANCELLED
        done = client.generate_text("hi", max_new_tokens=3, session_id="done")
        assert client.cancel(done.session_id) is SessionState.FINISHED

        info = client.get_session("done")
        assert info.state is SessionState.FINISHED and info.finish_reason is FinishReason.LENGTH
        assert info.usage.completion_tokens == 3 and info.verifier_id == "verifier-0"
        assert info.committed_token_ids == ()
        full = client.get_session("done", include_token_ids=True)
        assert full.committed_token_ids == (*PROMPT_IDS, 100, 101, 102)
        assert info.error is None

        controller.fake.sessions["broken"] = controller_pb2.Session(
            session_id="broken",
            state=controller_pb2.SESSION_STATE_FAILED,
            error=controller_pb2.SessionError(code=grpc.StatusCode.UNAVAILABLE.value[0], message="no verifier"),
        )
        failed = client.get_session("broken")
        assert failed.state is SessionState.FAILED
        assert failed.error == SessionError(grpc.StatusCode.UNAVAILABLE, "no verifier")

        with pytest.raises(NotFoundError, match="nope"):
            client.cancel("nope")


def test_bearer_token_is_sent_as_metadata(controller: Server) -> None:
    controller.fake.behaviour.required_token = "s3cret"
    with client_for(controller, auth_token="s3cret") as client:
        client.generate_text("hi", max_new_tokens=1)
    assert controller.fake.metadata[-1]["authorization"] == "Bearer s3cret"
    assert controller.fake.metadata[-1]["user-agent"].startswith("eesd-client/")
    with client_for(controller) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.generate_text("hi", max_new_tokens=1)
    with pytest.raises(InvalidArgumentError):
        EesdClient(controller.address, auth_token="bad\ntoken")
