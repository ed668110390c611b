"""Cancelling a live session: it stops within a round, keeps what it committed, and the stack serves on."""

import time
import uuid

import grpc
from eesd_client import EesdClient, FinishReason, SessionState

from tests.e2e.helpers import assert_healthy, oracle

PROMPT = [7, 8, 9, 10]
MAX_NEW = 300


def test_cancel_stops_a_streaming_session_and_keeps_its_tokens(main_stack, main_model):
    session_id = uuid.uuid4().hex
    with EesdClient(main_stack.controller_address, timeout=120) as client:
        stream = client.generate(PROMPT, max_new_tokens=MAX_NEW, policy="fixed", session_id=session_id)
        received = list(next(iter(stream)).token_ids)
        assert client.cancel(session_id) in (SessionState.CANCELLED, SessionState.FINISHED)
        for chunk in stream:
            received += chunk.token_ids
        result = stream.result()
        assert result.stats.finish_reason == FinishReason.CANCELLED
        assert len(received) < MAX_NEW
        assert tuple(received) == oracle(main_model, PROMPT, MAX_NEW)[: len(received)]
        session = client.get_session(session_id, include_token_ids=True)
        assert session.state == SessionState.CANCELLED
        assert list(session.committed_token_ids) == PROMPT + received  # nothing committed is lost
    assert_healthy(main_stack, main_model)


def test_client_hanging_up_stops_the_session_resumably(main_stack, main_model):
    """A stream that ends before its session (the client went away) stops the session, FAILED with
    CANCELLED: the same request resumes it, while a Cancel ends a session for good."""
    session_id = uuid.uuid4().hex
    with EesdClient(main_stack.controller_address, timeout=120) as client:
        options = dict(max_new_tokens=MAX_NEW, policy="fixed", stop_on_eos=False, session_id=session_id)
        stream = client.generate(PROMPT, **options)
        first = list(next(iter(stream)).token_ids)
        stream.cancel()
        for _ in range(100):  # the controller notices the cancelled call at its next yield
            info = client.get_session(session_id)
            if info.state != SessionState.ACTIVE:
                break
            time.sleep(0.1)
        assert info.state == SessionState.FAILED and info.error.code == grpc.StatusCode.CANCELLED
        whole = client.generate_text(PROMPT, **options)  # resumes: the SDK has none of its tokens
        assert whole.token_ids == oracle(main_model, PROMPT, MAX_NEW)
        assert first == list(whole.token_ids[: len(first)])
    assert_healthy(main_stack, main_model)
