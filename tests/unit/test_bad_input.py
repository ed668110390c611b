"""Bad input gets a clear error naming the field; nothing half-done is left behind."""

import pytest

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import InvalidArgument
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.rounds import DraftBlock, DraftRequest, VerifyRequest
from eesd.verifier import Verifier


@pytest.fixture(scope="module")
def engine(tiny_models):
    return SpeculativeEngine(Drafter(tiny_models["llama"], 2), Verifier(tiny_models["llama"]))


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], GenerationParams(5), "prompt_ids"),
        ([1, 384], GenerationParams(5), "prompt_ids"),
        ([1, -1], GenerationParams(5), "prompt_ids"),
        ([1], GenerationParams(0), "max_new_tokens"),
        ([1], GenerationParams(-3), "max_new_tokens"),
        ([1], GenerationParams(5, policy=PolicyParams("nope")), "policy"),
        ([1], GenerationParams(5, sampling=SamplingParams(temperature=-1.0)), "temperature"),
        ([1], GenerationParams(5, sampling=SamplingParams(1.0, top_p=0.0)), "top_p"),
        ([1], GenerationParams(5, sampling=SamplingParams(1.0, top_k=-2)), "top_k"),
    ],
)
def test_engine_rejects_bad_requests_naming_the_field(engine, prompt, params, field):
    with pytest.raises(InvalidArgument) as info:
        engine.generate(prompt, params)
    assert info.value.field == field
    assert len(engine.verifier.sessions) == 0 and len(engine.drafter.sessions) == 0
    assert engine.generate([1, 2], GenerationParams(3)).stats.generated == 3  # still serving


@pytest.mark.parametrize("n", [0, 4, -1])
def test_exit_layer_outside_range(tiny_models, n):
    with pytest.raises(InvalidArgument, match="exit_layer"):
        Drafter(tiny_models["llama"], n)


def test_missing_model_dir(tmp_path):
    with pytest.raises(InvalidArgument, match="model_dir"):
        Verifier(tmp_path / "absent")
    with pytest.raises(InvalidArgument, match="model_dir"):
        Drafter(tmp_path / "absent", 1)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        (DraftBlock([999], [0.5]), "draft.tokens"),
        (DraftBlock([3], [0.5], q_ids=None, q_probs=None), "draft.q"),
        (DraftBlock([3], [0.5], q_ids=[[4, 5]], q_probs=[[0.5, 0.5]]), "draft.q"),  # draft not in its q support
        (DraftBlock([3], [0.5], q_ids=[[3, 5]], q_probs=[[0.9, 0.9]]), "draft.q_probs"),
    ],
)
def test_verifier_refuses_malformed_draft_blocks(engine, block, field):
    request = VerifyRequest("s", 0, 0, [1, 2], block, seed=1, sampling=SamplingParams(temperature=1.0))
    with pytest.raises(InvalidArgument) as info:
        engine.verifier.verify(request)
    assert info.value.field == field


def test_empty_pending_is_refused(engine):
    with pytest.raises(InvalidArgument, match="pending_tokens"):
        engine.verifier.verify(VerifyRequest("s2", 0, 0, [], DraftBlock([], []), seed=1))


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (SamplingParams(temperature=1e-40), "temperature"),
        (SamplingParams(temperature=float("inf")), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(temperature=1.0, top_p=float("nan")), "top_p"),
        (SamplingParams(temperature=1.0, top_k=-1), "top_k"),
    ],
)
def test_internal_requests_validate_sampling(engine, sampling, field):
    """A drafter or verifier called directly checks the sampling parameters the controller would have."""
    draft = DraftRequest("s3", 0, 0, [1, 2], 4, seed=1, sampling=sampling)
    with pytest.raises(InvalidArgument, match=field):
        engine.drafter.propose(draft)
    with pytest.raises(InvalidArgument, match=field):
        engine.verifier.verify(VerifyRequest("s3", 0, 0, [1, 2], DraftBlock([], []), seed=1, sampling=sampling))


@pytest.mark.parametrize("session_id", ["", "a" * 129, "bad\nid", "spa ce", "ünï"])
def test_session_ids_are_bounded_and_safe(session_id):
    from eesd.params import check_session_id

    with pytest.raises(InvalidArgument, match="session_id") as raised:
        check_session_id(session_id)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 200  # never echoed back


def test_requests_beyond_the_context_are_refused_up_front(engine):
    """The tiny models' context is 512: a request that could not finish inside it fails before any round."""
    with pytest.raises(InvalidArgument, match="max_new_tokens: must be <= 502"):
        engine.generate(list(range(3, 13)), GenerationParams(503))
    with pytest.raises(InvalidArgument, match="prompt_ids"):
        engine.generate([5] * 512, GenerationParams(1))
    assert len(engine.verifier.sessions) == 0
