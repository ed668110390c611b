"""Stop conditions: stop token ids in eesd.generation.finish, stop strings on the text (eesd.stops), and the
controller's round loop ending a session at a stop string that spans two rounds, with only the tokens up to
it committed and a resume that replays the same text."""

import asyncio
import json

import pytest
from tokenizers import Tokenizer, models

from controller.round_loop import Finished, RoundEvent
from controller.state_store import MemoryStateStore
from controller.text import TextCodec, TextStream
from eesd.errors import InvalidArgument
from eesd.generation import finish
from eesd.params import GenerationParams, PolicyParams, SamplingParams, StopConditions
from eesd.stops import StopText, first_stop, held_back
from tests.unit.test_resume import controller
from tests.unit.test_round_loop_repairs import PROMPT, InProcessNodes, wipe

EOS = frozenset({2})
VOCAB = 384


@pytest.mark.parametrize(
    ("new_tokens", "stop_on_eos", "stop_ids", "expected"),
    [
        ([10, 11, 12], True, (11,), ([10, 11], "stop")),  # the stop token is the last one kept
        ([10, 2, 11], True, (11,), ([10, 2], "eos")),  # whichever comes first
        ([10, 11, 2], True, (11,), ([10, 11], "stop")),
        ([10, 2, 11], False, (11,), ([10, 2, 11], "stop")),  # ignore_eos leaves stop ids on
        ([10, 12, 13], True, (11,), ([10, 12, 13], None)),
    ],
)
def test_stop_token_ids_end_a_round_like_eos(new_tokens, stop_on_eos, stop_ids, expected):
    params = GenerationParams(8, stop_on_eos=stop_on_eos, stop=StopConditions(token_ids=stop_ids))
    assert finish(new_tokens, 0, params, EOS) == expected


def test_stop_token_ids_beyond_the_budget_were_never_generated():
    params = GenerationParams(2, stop=StopConditions(token_ids=(12,)))
    assert finish([10, 11, 12], 0, params, EOS) == ([10, 11], "length")


@pytest.mark.parametrize(
    ("conditions", "field"),
    [
        (StopConditions(strings=("",)), "stop"),
        (StopConditions(strings=("x" * 257,)), "stop"),
        (StopConditions(strings=tuple("abcdefghijklmnopq")), "stop"),  # 17 strings
        (StopConditions(token_ids=(-1,)), "stop_token_ids"),
        (StopConditions(token_ids=tuple(range(65))), "stop_token_ids"),
    ],
)
def test_bad_stop_conditions_name_their_field(conditions, field):
    with pytest.raises(InvalidArgument) as refused:
        GenerationParams(8, stop=conditions).validate()
    assert refused.value.field == field


def test_held_back_and_first_stop():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("ab", ["abc", "bcd"]) == 2
    assert held_back("xwor", ["world", "or"]) == 3
    assert first_stop("a stop and an end", ["end", "stop"]) == 2
    assert first_stop("nothing", ["end"]) is None


def characters(text: str):
    """A detokenizer where token i is the i-th character of `text`: feed(range(...)) walks the text."""
    return lambda token: text[token]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 100])
def test_stop_text_is_the_same_however_the_tokens_are_cut_into_rounds(cut):
    text = "The answer: 42. END of the line. END"
    tokens = list(range(len(text)))
    stops = StopText(("END", "line"), characters(text))
    sent, keep = "", None
    for start in range(0, len(tokens), cut):
        scan = stops.feed(tokens[start : start + cut])
        sent += scan.text
        if scan.keep is not None:
            keep = start + scan.keep
            break
    assert sent == "The answer: 42. "
    assert keep == text.index("END") + 3  # the token that completed the string is the last one kept


def test_text_that_begins_no_stop_string_is_released_at_the_end():
    text = "an ENDING? no: EN"
    stops = StopText(("END!",), characters(text))
    first = stops.feed(list(range(len(text))))
    assert first.keep is None and first.text == "an ENDING? no: "  # "EN" may begin "END!"
    assert stops.flush() == "EN"


def test_a_resumed_text_sends_what_the_first_stream_held_back():
    text = "abc wo wo world"
    whole = StopText(("world",), characters(text))
    first = whole.feed(list(range(6))).text  # "abc wo": "wo" held back
    resumed = StopText(("world",), characters(text))
    resumed.skip(list(range(6)))
    rest = resumed.feed(list(range(6, len(text))))
    assert first == "abc " and first + rest.text == "abc wo wo " and rest.keep == len(text) - 6


def test_without_stop_strings_nothing_is_held_back_and_no_tokenizer_means_no_text():
    assert StopText((), characters("abc")).feed([0, 1, 2]).text == "abc"
    assert StopText((), None).feed([0, 1, 2]).text == ""


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> TextCodec:
    """A word-level tokenizer over the tiny model's vocabulary: token i reads "w<i>", tokens joined by spaces."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    json.loads(path.read_text())  # written whole
    return TextCodec(path)


@pytest.fixture
def fresh(tiny_models):
    from eesd.drafter import Drafter
    from eesd.verifier import Verifier

    nodes = {"d1:1": Drafter(tiny_models["llama"], 2), "v1:1": Verifier(tiny_models["llama"])}
    for model in nodes.values():
        wipe(model)
    return nodes


def text_of(codec: TextCodec, tokens: list[int]) -> str:
    return TextStream(codec).push(tokens)


async def run(loop, params, session_id: str, received: int = 0):
    rounds, finished = [], None
    async for event in loop.generate(PROMPT, params, session_id, received):
        if isinstance(event, RoundEvent):
            rounds.append(event)
        else:
            finished = event
    return rounds, finished


SAMPLINGS = [SamplingParams(), SamplingParams(0.8, top_k=50, seed=7)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
def test_a_stop_string_across_two_rounds_ends_the_session_there(fresh, codec, sampling):
    params = GenerationParams(40, sampling, PolicyParams("fixed", k_max=3), stop_on_eos=False)

    async def scenario():
        store = MemoryStateStore()
        loop = controller(store, InProcessNodes(fresh, lambda r, n: None))
        loop.codec = codec
        whole, _ = await run(loop, params, "whole")
        # A stop string made of the last characters of one round's text and the first of the next one's.
        texts = [e.text for e in whole]
        at = next(i for i in range(2, len(whole)) if len(whole[i].tokens) > 1 and texts[i])
        stop = texts[at - 1][-2:] + texts[at][:3]
        stopped = GenerationParams(40, sampling, params.policy, stop_on_eos=False, stop=StopConditions((stop,)))
        rounds, finished = await run(loop, stopped, "stopped")
        record = await store.get_session("stopped")
        # Resumed after the client got the first two rounds: the same text, continued.
        got = sum(len(e.tokens) for e in rounds[:2])
        replay, _ = await run(loop, stopped, "stopped", got)
        await loop.aclose()
        return whole, stop, rounds, finished, record, replay

    whole, stop, rounds, finished, record, replay = asyncio.run(scenario())
    whole_tokens = [t for e in whole for t in e.tokens]
    whole_text = "".join(e.text for e in whole)
    start = whole_text.index(stop)
    assert "".join(e.text for e in rounds) == whole_text[:start]
    kept = [t for e in rounds for t in e.tokens]
    # The tokens are the model's up to the one whose text completes the string, and nothing else is stored.
    assert kept == whole_tokens[: len(kept)] and stop in text_of(codec, kept) and stop not in text_of(codec, kept[:-1])
    assert finished.finish_reason == "stop" and finished.stats.generated == len(kept)
    assert record.status == "finished" and record.finish_reason == "stop" and record.generated == kept
    assert "".join(e.text for e in rounds[:2]) + replay[0].text == whole_text[:start]


def test_stop_strings_need_a_tokenizer_and_stop_ids_the_vocabulary(fresh):
    loop = controller(MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None))

    async def refused(params):
        with pytest.raises(InvalidArgument) as error:
            await run(loop, params, "x")
        return error.value.field

    assert asyncio.run(refused(GenerationParams(4, stop=StopConditions(("a",))))) == "stop"
    assert asyncio.run(refused(GenerationParams(4, stop=StopConditions(token_ids=(VOCAB,))))) == "stop_token_ids"


def test_a_stop_token_id_ends_the_session_through_the_round_loop(fresh):
    params = GenerationParams(40, policy=PolicyParams("fixed", k_max=3), stop_on_eos=False)

    async def scenario():
        loop = controller(MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None))
        whole, _ = await run(loop, params, "whole")
        tokens = [t for e in whole for t in e.tokens]
        stop_id = tokens[9]
        stop = StopConditions(token_ids=(stop_id,))
        stopped = GenerationParams(40, policy=params.policy, stop_on_eos=False, stop=stop)
        rounds, finished = await run(loop, stopped, "stopped")
        await loop.aclose()
        return tokens, stop_id, [t for e in rounds for t in e.tokens], finished

    tokens, stop_id, kept, finished = asyncio.run(scenario())
    assert kept == tokens[: tokens.index(stop_id) + 1] and finished.finish_reason == "stop"
    assert isinstance(finished, Finished)
