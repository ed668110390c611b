"""Bad input gets the right gRPC status code and every service stays up (docs/architecture.md §11).

Controller checks call the raw generated stub, so the server's status code is what is asserted (the SDK
validates some input itself). Internal messages are sent straight to a drafter and a verifier.
"""

import uuid

import grpc
import pytest
from google.protobuf.message import Message

from eesd_proto.eesd.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    drafter_pb2,
    drafter_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from tests.e2e.helpers import assert_healthy

VOCAB = 384  # eesd.tiny checkpoints
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def channels(main_stack):
    opened = {}

    def open_channel(address: str) -> grpc.Channel:
        if address not in opened:
            opened[address] = grpc.insecure_channel(address)
        return opened[address]

    yield open_channel
    for channel in opened.values():
        channel.close()


@pytest.fixture
def controller(main_stack, channels):
    return controller_pb2_grpc.ControllerServiceStub(channels(main_stack.controller_address))


@pytest.fixture
def drafter(main_stack, channels):
    return drafter_pb2_grpc.DrafterServiceStub(channels(main_stack.by_role("drafter")[0].address))


@pytest.fixture
def verifier(main_stack, channels):
    return verifier_pb2_grpc.VerifierServiceStub(channels(main_stack.by_role("verifier")[0].address))


@pytest.fixture(autouse=True)
def still_healthy(main_stack, main_model):
    """After each bad request the whole stack still generates correctly."""
    yield
    assert_healthy(main_stack, main_model)


def call_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The error of a unary call, or of a streaming call once its responses are drained."""
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, timeout=60, **kwargs)
        if not isinstance(result, Message):
            list(result)
    return info.value


def generate(**fields) -> controller_pb2.GenerateRequest:
    return controller_pb2.GenerateRequest(**{"max_new_tokens": 5, **fields})


def ids(*tokens: int) -> controller_pb2.TokenIds:
    return controller_pb2.TokenIds(ids=list(tokens))


# -- controller -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generate(prompt_ids=ids()), "prompt_ids"),
        (generate(), "prompt_ids"),  # no prompt at all
        (generate(prompt_ids=ids(3, 4), max_new_tokens=0), "max_new_tokens"),
        (generate(prompt_ids=ids(3, 4), max_new_tokens=1_000_000), "max_new_tokens"),
        (generate(prompt_ids=ids(3, VOCAB)), "prompt_ids"),
        (generate(prompt_ids=ids(3, 2**32 - 1)), "prompt_ids"),
        (generate(prompt_ids=ids(3), policy=common_pb2.PolicyParams(name="no-such-policy")), "policy"),
        (generate(prompt_ids=ids(3), policy=common_pb2.PolicyParams(name="fixed", options={"nope": 1})), "policy"),
        (generate(prompt_ids=ids(3), policy=common_pb2.PolicyParams(name="fixed", k_max=1000)), "k_max"),
        (generate(prompt_ids=ids(3), sampling=common_pb2.SamplingParams(temperature=-1.0)), "temperature"),
        (generate(prompt_ids=ids(3), sampling=common_pb2.SamplingParams(temperature=1.0, top_p=1.5)), "top_p"),
        (generate(prompt_ids=ids(3), sampling=common_pb2.SamplingParams(temperature=1.0, seed=2**63)), "seed"),
        (generate(prompt_text="hello"), "prompt_text"),  # tiny checkpoints have no tokenizer
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_generate_rejects_bad_requests(controller, request_, field):
    error = call_error(controller.Generate, request_)
    assert error.code() == INVALID, error
    assert field in error.details()


def test_generate_rejects_a_session_id_in_use_by_another_request(controller):
    session_id = uuid.uuid4().hex
    first = list(controller.Generate(generate(prompt_ids=ids(3, 4), session_id=session_id), timeout=60))
    assert first[-1].WhichOneof("event") == "summary"
    error = call_error(controller.Generate, generate(prompt_ids=ids(3, 5), session_id=session_id))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
    # The same request again resumes the (finished) session: it replays what the client says it lacks.
    again = list(controller.Generate(generate(prompt_ids=ids(3, 4), session_id=session_id), timeout=60))
    assert [t for r in again[:-1] for t in r.chunk.token_ids] == [t for r in first[:-1] for t in r.chunk.token_ids]
    assert again[-1].summary.finish_reason == first[-1].summary.finish_reason


@pytest.mark.parametrize("method", ["GetSession", "Cancel"])
def test_unknown_session_is_not_found(controller, method):
    request = getattr(controller_pb2, f"{method}Request")(session_id="no-such-session")
    error = call_error(getattr(controller, method), request)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error


@pytest.mark.parametrize("method", ["GetSession", "Cancel"])
def test_empty_session_id_is_invalid(controller, method):
    error = call_error(getattr(controller, method), getattr(controller_pb2, f"{method}Request")())
    assert error.code() == INVALID, error


# -- drafter ----------------------------------------------------------------------------------------------


def draft_request(main_stack, **fields) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(
        **{
            "session_id": uuid.uuid4().hex,
            "round": 0,
            "base_length": 0,
            "pending_token_ids": [3, 4, 5],
            "max_tokens": 3,
            "seed": 1,
            "policy": common_pb2.PolicyParams(name="fixed", k_max=3),
            "verifier_address": main_stack.by_role("verifier")[0].address,
            **fields,
        }
    )


def test_draft_with_pending_tokens_outside_the_vocabulary(main_stack, drafter):
    error = call_error(drafter.Draft, draft_request(main_stack, pending_token_ids=[3, VOCAB + 5]))
    assert error.code() == INVALID and "pending_tokens" in error.details(), error


def test_draft_beyond_the_cache_is_a_cache_mismatch(main_stack, drafter):
    reply = drafter.Draft(draft_request(main_stack, base_length=50), timeout=60)
    assert reply.WhichOneof("outcome") == "cache_mismatch"
    mismatch = reply.cache_mismatch
    assert (mismatch.cache_length, mismatch.base_length) == (0, 50)
    assert mismatch.node_role == common_pb2.NODE_ROLE_DRAFTER


@pytest.mark.parametrize("address", ["127.0.0.1:1", "169.254.169.254:80", "localhost:22", "not-an-address"])
def test_draft_to_a_verifier_the_drafter_was_not_configured_with_is_refused(main_stack, drafter, address):
    """No request makes a drafter dial an address of its choosing (SSRF): it streams only to verifiers it
    was configured with, and refuses before any work."""
    error = call_error(drafter.Draft, draft_request(main_stack, verifier_address=address))
    assert error.code() == INVALID and "verifier_address" in error.details(), error


@pytest.mark.parametrize("overhead", [float("nan"), float("inf"), -1.0, 1e12])
def test_draft_with_a_hostile_round_overhead_is_refused(main_stack, drafter, overhead):
    error = call_error(drafter.Draft, draft_request(main_stack, round_overhead_ms=overhead))
    assert error.code() == INVALID and "round_overhead_ms" in error.details(), error


def test_draft_with_an_unknown_policy(main_stack, drafter):
    error = call_error(drafter.Draft, draft_request(main_stack, policy=common_pb2.PolicyParams(name="nope", k_max=3)))
    assert error.code() == INVALID, error


def test_a_complete_round_straight_through_the_drafter(main_stack, drafter):
    """The baseline the malformed messages are compared with: a well-formed Draft gets a verdict."""
    reply = drafter.Draft(draft_request(main_stack), timeout=60)
    assert reply.WhichOneof("outcome") == "result"
    assert reply.result.verdict.accepted <= len(reply.result.draft.token_ids) <= 3


def test_prefill_beyond_the_cache_is_a_cache_mismatch(drafter, verifier):
    for stub, prefix, role in (
        (drafter, drafter_pb2.DrafterServicePrefillRequest, common_pb2.NODE_ROLE_DRAFTER),
        (verifier, verifier_pb2.VerifierServicePrefillRequest, common_pb2.NODE_ROLE_VERIFIER),
    ):
        reply = stub.Prefill(prefix(session_id=uuid.uuid4().hex, base_length=9, token_ids=[3, 4]), timeout=60)
        assert reply.WhichOneof("outcome") == "cache_mismatch"
        assert reply.cache_mismatch.node_role == role and reply.cache_mismatch.cache_length == 0


# -- verifier ---------------------------------------------------------------------------------------------


def verify_request(**fields) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(
        **{
            "session_id": uuid.uuid4().hex,
            "round": 0,
            "base_length": 0,
            "pending_token_ids": [3, 4, 5],
            "draft": verifier_pb2.DraftBlock(token_ids=[6, 7]),
            "seed": 1,
            **fields,
        }
    )


SAMPLED = common_pb2.SamplingParams(temperature=1.0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (verify_request(draft=verifier_pb2.DraftBlock(token_ids=[6, VOCAB])), "draft.tokens"),
        (verify_request(pending_token_ids=[VOCAB + 1]), "pending_tokens"),
        (verify_request(pending_token_ids=[]), "pending_tokens"),
        (verify_request(sampling=SAMPLED), "draft.q"),  # sampling without q
        (
            verify_request(
                sampling=SAMPLED,
                draft=verifier_pb2.DraftBlock(
                    token_ids=[6], q=[verifier_pb2.SparseDistribution(token_ids=[6, 7], probs=[0.9, 0.9])]
                ),
            ),
            "draft.q_probs",
        ),
        (
            verify_request(
                sampling=SAMPLED,
                draft=verifier_pb2.DraftBlock(
                    token_ids=[6], q=[verifier_pb2.SparseDistribution(token_ids=[7, 8], probs=[0.5, 0.5])]
                ),
            ),
            "draft.q",
        ),
        (verify_request(draft=verifier_pb2.DraftBlock(token_ids=[6, 7], confidences=[0.5])), "draft.confidences"),
    ],
    ids=["draft-oov", "pending-oov", "pending-empty", "no-q", "q-not-a-distribution", "token-outside-q", "conf"],
)
def test_verify_rejects_malformed_blocks(verifier, request_, field):
    error = call_error(verifier.Verify, request_)
    assert error.code() == INVALID, error
    assert field in error.details()


def test_verify_beyond_the_cache_is_a_cache_mismatch(verifier):
    reply = verifier.Verify(verify_request(base_length=20), timeout=60)
    assert reply.WhichOneof("outcome") == "cache_mismatch"
    assert reply.cache_mismatch.cache_length == 0 and reply.cache_mismatch.node_role == common_pb2.NODE_ROLE_VERIFIER


def hello(identity: common_pb2.ModelIdentity) -> verifier_pb2.VerifyStreamRequest:
    return verifier_pb2.VerifyStreamRequest(hello=verifier_pb2.VerifyHello(identity=identity, node_id="test"))


def test_verify_stream_must_open_with_a_hello(verifier):
    error = call_error(verifier.VerifyStream, iter([verifier_pb2.VerifyStreamRequest(verify_request=verify_request())]))
    assert error.code() == INVALID and "hello" in error.details(), error
    assert call_error(verifier.VerifyStream, iter([])).code() == INVALID


def test_verify_stream_refuses_a_drafter_of_another_model(verifier, drafter):
    identity = drafter.GetModelIdentity(drafter_pb2.DrafterServiceGetModelIdentityRequest(), timeout=60).identity
    other = common_pb2.ModelIdentity()
    other.CopyFrom(identity)
    other.config_hash = "0" * len(identity.config_hash)
    error = call_error(verifier.VerifyStream, iter([hello(other)]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error


def test_one_bad_round_does_not_end_the_stream(verifier, drafter):
    """A malformed round on a VerifyStream is answered with a round_error; the next round on the same
    stream still gets its verdict."""
    identity = drafter.GetModelIdentity(drafter_pb2.DrafterServiceGetModelIdentityRequest(), timeout=60).identity
    bad = verify_request(draft=verifier_pb2.DraftBlock(token_ids=[VOCAB + 7]))
    good = verify_request()
    messages = [hello(identity), *(verifier_pb2.VerifyStreamRequest(verify_request=r) for r in (bad, good))]
    answers = list(verifier.VerifyStream(iter(messages), timeout=60))
    assert [a.WhichOneof("kind") for a in answers] == ["hello", "round_error", "verdict"]
    assert answers[1].round_error.code == INVALID.value[0] and answers[1].round_error.session_id == bad.session_id
    assert answers[2].verdict.session_id == good.session_id
