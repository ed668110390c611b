"""Log probabilities of the generated tokens (eesd/logprobs.py), through the round loop with the tiny model's
drafter and verifier in process: each token's log p equals transformers' own log_softmax at its position
(fp32), with speculation on and off, greedy and sampled; top entries sorted, holding the chosen token when it
is among them; trimmed with the tokens at a stop; none computed unless asked; and the wire format."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from controller.discovery import StaticDiscovery
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import MemoryStateStore
from eesd.drafter import Drafter
from eesd.errors import FailedPrecondition, InvalidArgument
from eesd.logprobs import log_target, token_logprobs
from eesd.params import GenerationParams, PolicyParams, SamplingParams, StopConditions
from eesd.rounds import DraftBlock, DraftRequest, TokenLogprob, Verdict, VerifyRequest
from eesd.session import Session
from eesd.verifier import Verifier
from serving import convert
from tests.unit.test_round_loop_repairs import InProcessNodes, wipe

PROMPT = [5, 9, 33, 71, 2, 140, 7]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_models):
    path = tiny_models["llama"]
    return {"d1:1": Drafter(path, 2), "v1:1": Verifier(path)}


@pytest.fixture(scope="module")
def hf(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


def generate(models, params: GenerationParams, eos=frozenset()) -> tuple[list[RoundEvent], Finished]:
    async def scenario():
        nodes = InProcessNodes(models, lambda r, n: None)
        router = Router(StaticDiscovery("d1:1"), StaticDiscovery("v1:1"), down_s=60.0)
        loop = RoundLoop(MemoryStateStore(), router, nodes, eos, vocab_size=384)
        events = [event async for event in loop.generate(PROMPT, params)]
        await loop.aclose()
        return events[:-1], events[-1]

    for model in models.values():
        wipe(model)
    return asyncio.run(scenario())


def reference(hf, tokens: list[int], sampling: SamplingParams) -> torch.Tensor:
    """log p at each generated position of PROMPT + tokens, from transformers' forward pass."""
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + tokens])).logits[0].float()
    return log_target(logits[len(PROMPT) - 1 : len(PROMPT) - 1 + len(tokens)], sampling)


def flat(events: list[RoundEvent]) -> tuple[list[int], list[TokenLogprob]]:
    tokens, logprobs = [], []
    for event in events:
        assert event.logprobs is not None and len(event.logprobs) == len(event.tokens)
        tokens += event.tokens
        logprobs += event.logprobs
    return tokens, logprobs


SPECULATION = {"on": PolicyParams("fixed", 3, {"k": 3}), "off": PolicyParams("off", 0)}


@pytest.mark.parametrize("speculation", ["on", "off"])
@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(0.8, top_k=40, top_p=0.9, seed=7)],
    ids=["greedy", "sampled"],
)
def test_each_tokens_logprob_is_the_models_own_at_its_position(models, hf, speculation, sampling):
    params = GenerationParams(24, sampling, SPECULATION[speculation], stop_on_eos=False, top_logprobs=5)
    events, finished = generate(models, params)
    tokens, logprobs = flat(events)
    assert len(tokens) == 24 and finished.finish_reason == "length"
    if speculation == "on":
        assert finished.stats.accepted > 0  # accepted drafts carry the verifier's log p, not the drafter's
    expected = reference(hf, tokens, sampling)
    for position, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        row = expected[position]
        assert lp.token == token
        assert abs(lp.logprob - row[token].item()) < TOLERANCE
        assert 1 <= len(lp.top) <= 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        top_ids = [i for i, _ in lp.top]
        assert top_ids == row.topk(len(top_ids)).indices.tolist()
        for i, v in lp.top:
            assert abs(v - row[i].item()) < TOLERANCE
        if row[token] >= row.topk(5).values[-1]:
            assert token in top_ids
        if sampling.greedy:
            assert top_ids[0] == token  # greedy picks the most likely token: the first entry
        else:
            assert lp.logprob > float("-inf")  # a committed token has p > 0 whatever top-k / top-p cut


def test_greedy_logprobs_do_not_depend_on_speculation(models):
    on, _ = generate(models, GenerationParams(16, policy=SPECULATION["on"], stop_on_eos=False, top_logprobs=0))
    off, _ = generate(models, GenerationParams(16, policy=SPECULATION["off"], stop_on_eos=False, top_logprobs=0))
    (tokens_on, lp_on), (tokens_off, lp_off) = flat(on), flat(off)
    assert tokens_on == tokens_off
    assert all(a.top == () == b.top for a, b in zip(lp_on, lp_off, strict=True))  # 0: no top entries
    assert max(abs(a.logprob - b.logprob) for a, b in zip(lp_on, lp_off, strict=True)) < TOLERANCE


def test_none_unless_asked(models):
    events, _ = generate(models, GenerationParams(8, policy=SPECULATION["on"], stop_on_eos=False))
    assert all(event.logprobs is None for event in events)


def test_logprobs_are_trimmed_with_the_tokens_at_eos_length_and_stop_ids(models):
    whole, _ = generate(models, GenerationParams(20, policy=SPECULATION["on"], stop_on_eos=False, top_logprobs=1))
    tokens, _ = flat(whole)
    # A stop token id in the middle of a round: the round ends there, its logprobs too.
    stop = tokens[9]
    events, finished = generate(
        models,
        GenerationParams(20, policy=SPECULATION["on"], stop=StopConditions((), (stop,)), top_logprobs=1),
    )
    cut, _ = flat(events)
    assert finished.finish_reason == "stop" and cut == tokens[: tokens.index(stop) + 1]
    # EOS likewise; and a budget that ends inside a round (7 = 4 + 3 with k = 3).
    events, finished = generate(models, GenerationParams(20, policy=SPECULATION["on"], top_logprobs=1), {stop})
    assert finished.finish_reason == "eos" and flat(events)[0] == cut
    events, finished = generate(models, GenerationParams(7, policy=SPECULATION["on"], top_logprobs=1))
    assert finished.finish_reason == "length" and flat(events)[0] == tokens[:7]


def test_top_entries_leave_out_tokens_the_filters_removed():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    out = token_logprobs(logits, [1], SamplingParams(1.0, top_k=2), 4)
    (lp,) = out
    assert [i for i, _ in lp.top] == [0, 1]  # tokens 2-4 have p = 0 under top-k 2
    assert lp.logprob == pytest.approx(torch.tensor([3.0, 2.0]).log_softmax(0)[1].item())
    greedy = token_logprobs(logits, [1], SamplingParams(0.0, top_k=2), 4)[0]  # top-k does not apply to greedy
    assert len(greedy.top) == 4 and greedy.logprob == pytest.approx(logits.log_softmax(-1)[0, 1].item())


def test_the_verifier_refuses_a_top_logprobs_out_of_range(models):
    request = VerifyRequest("s", 0, 0, PROMPT, DraftBlock([], []), 0, top_logprobs=21)
    with pytest.raises(InvalidArgument, match="top_logprobs"):
        models["v1:1"].verify(request)
    with pytest.raises(InvalidArgument, match="top_logprobs"):
        GenerationParams(4, top_logprobs=-2).validate()


def test_a_verdict_without_the_asked_logprobs_is_refused():
    """A verifier that predates log probabilities ignores the field: the round fails instead of streaming
    tokens without them."""
    session = Session.start("s", PROMPT, GenerationParams(4, top_logprobs=0), 0)
    with pytest.raises(FailedPrecondition, match="log probabilities"):
        session.settle(DraftBlock([], []), Verdict("s", 0, 0, 11, 8), None, 0.0, 0.0)


def test_wire_round_trip():
    request = DraftRequest("s", 3, 5, [1, 2], 4, 9, top_logprobs=2)
    assert convert.draft_request_from_proto(convert.draft_request_to_proto(request, "v", "v")) == request
    plain = DraftRequest("s", 3, 5, [1, 2], 4, 9)
    message = convert.draft_request_to_proto(plain, "v", "v")
    assert not message.HasField("top_logprobs") and convert.draft_request_from_proto(message) == plain
    verify = request.verify_request(DraftBlock([7], [0.5]))
    assert verify.top_logprobs == 2
    assert convert.verify_request_from_proto(convert.verify_request_to_proto(verify)) == verify
    logprobs = (TokenLogprob(7, -0.5, ((7, -0.5), (3, -1.25))), TokenLogprob(8, -2.0, ((1, -0.75), (8, -2.0))))
    verdict = Verdict("s", 3, 1, 8, 9, logprobs)
    message = convert.verdict_to_proto(verdict, verify, 1.0)
    assert convert.verdict_from_proto(message, 2) == verdict
    assert convert.verdict_from_proto(message) == Verdict("s", 3, 1, 8, 9)  # not asked: None
