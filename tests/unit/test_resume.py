"""Resuming a session on another controller (docs/architecture.md §8.7), fast: RoundLoops sharing one state
store drive in-process drafters and verifiers. A client that lost its stream resumes with the tokens it has
and gets every other token exactly once; the output equals an uninterrupted run; two controllers never
drive one session at once."""

import asyncio
import contextlib

import pytest

from controller.discovery import StaticDiscovery
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.servicer import ControllerServicer
from controller.state_store import MemoryStateStore
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import Aborted, AlreadyExists, InvalidArgument
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.verifier import Verifier
from eesd_proto.eesd.v1 import controller_pb2
from tests.unit.test_round_loop_repairs import PROMPT, InProcessNodes, wipe

GREEDY = GenerationParams(40, policy=PolicyParams("fixed", k_max=3), stop_on_eos=False)
SAMPLED = GenerationParams(
    40, SamplingParams(temperature=0.8, top_k=50, seed=1234), PolicyParams("beta-ts", k_max=4), stop_on_eos=False
)


def controller(store: MemoryStateStore, nodes: InProcessNodes) -> RoundLoop:
    router = Router(StaticDiscovery("d1:1"), StaticDiscovery("v1:1"), down_s=60.0)
    return RoundLoop(store, router, nodes, frozenset(), vocab_size=384)


async def collect(events, stop_after: int | None = None) -> tuple[list[int], Finished | None]:
    """The tokens of a stream and its summary; with `stop_after`, the client hangs up after that many
    events (its stream ends there)."""
    tokens, finished = [], None
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, RoundEvent):
                tokens += event.tokens
            else:
                finished = event
            if stop_after is not None and (stop_after := stop_after - 1) == 0:
                break
    return tokens, finished


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"d1:1": Drafter(tiny_models["llama"], 2), "v1:1": Verifier(tiny_models["llama"])}


@pytest.fixture
def fresh(models):
    """The nodes, with no session left from another test."""
    for model in models.values():
        wipe(model)
    return models


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_stream_lost_midway_resumes_on_another_controller_exactly_once(fresh, params):
    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        whole, _ = await collect(controller(store, nodes).generate(PROMPT, params, "uninterrupted"))
        first, second = controller(store, nodes), controller(store, nodes)
        got, none = await collect(first.generate(PROMPT, params, "s"), stop_after=4)
        assert none is None and 0 < len(got) < len(whole)
        await first.aclose()  # the hang-up's end is written in the background
        stored = await store.get_session("s")
        assert stored.status == "failed" and stored.error_code == "CANCELLED"  # resumable, not cancelled
        rest, finished = await collect(second.generate(PROMPT, params, "s", received_tokens=len(got)))
        await second.aclose()
        return whole, got, rest, finished

    whole, got, rest, finished = asyncio.run(scenario())
    assert got + rest == whole  # no token twice, none missing
    assert finished.finish_reason == "length" and finished.stats.generated == len(whole)


def test_the_greedy_resumed_output_is_the_models(fresh):
    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        got, _ = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "s"), stop_after=3)
        rest, _ = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "s", received_tokens=len(got)))
        return got + rest

    plain = GenerationParams(GREEDY.max_new_tokens, policy=PolicyParams("off"), stop_on_eos=False)
    assert asyncio.run(scenario()) == SpeculativeEngine(None, fresh["v1:1"]).generate(PROMPT, plain).token_ids


def test_two_controllers_racing_on_one_session_never_both_commit(fresh):
    """The first controller still drives when the second takes the session over: the first is refused at
    its next commit (ABORTED) and stops; the second's client gets the whole output, each token once."""

    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        whole, _ = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "uninterrupted"))
        first, second = controller(store, nodes), controller(store, nodes)
        first_events = first.generate(PROMPT, GREEDY, "s")
        early = []
        async for event in first_events:
            early += event.tokens
            if len(early) >= 6:
                break  # the first controller's stream is still open: it drives on when asked
        taken, finished = await collect(second.generate(PROMPT, GREEDY, "s", received_tokens=len(early)))
        with pytest.raises(Aborted):
            async for event in first_events:
                early += event.tokens
        return whole, early, taken, finished

    whole, early, taken, finished = asyncio.run(scenario())
    assert finished is not None and early[: len(whole) - len(taken)] + taken == whole


def test_a_finished_session_replays_what_its_client_missed(fresh):
    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        whole, _ = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "s"))
        again, finished = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "s", received_tokens=10))
        return whole, again, finished

    whole, again, finished = asyncio.run(scenario())
    assert again == whole[10:] and finished.finish_reason == "length"


def test_a_used_id_with_another_request_or_too_many_received_tokens_is_refused(fresh):
    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        loop = controller(store, nodes)
        await collect(loop.generate(PROMPT, GREEDY, "s"))
        with pytest.raises(AlreadyExists):
            await collect(loop.generate(PROMPT + [1], GREEDY, "s"))
        with pytest.raises(AlreadyExists):
            await collect(loop.generate(PROMPT, SAMPLED, "s"))
        with pytest.raises(InvalidArgument) as info:
            await collect(loop.generate(PROMPT, GREEDY, "s", received_tokens=GREEDY.max_new_tokens + 1))
        assert info.value.field == "received_tokens"
        with pytest.raises(InvalidArgument):
            await collect(loop.generate(PROMPT, GREEDY, "new", received_tokens=3))

    asyncio.run(scenario())


def test_get_session_answers_the_same_on_every_replica(fresh):
    """A session's speculation statistics live in its record, not in the memory of the controller that ran
    it: another replica's GetSession shows them."""

    class NoMetadata:
        def invocation_metadata(self):
            return ()

    async def scenario():
        store, nodes = MemoryStateStore(), InProcessNodes(fresh, lambda r, n: None)
        _, finished = await collect(controller(store, nodes).generate(PROMPT, GREEDY, "s"))
        other = ControllerServicer(controller(store, nodes), store, None, PolicyParams("off", 0), 64, 128)
        reply = await other.GetSession(controller_pb2.GetSessionRequest(session_id="s"), NoMetadata())
        return finished, reply.session.speculation

    finished, speculation = asyncio.run(scenario())
    assert (speculation.rounds, speculation.drafted, speculation.accepted) == (
        finished.stats.rounds,
        finished.stats.drafted,
        finished.stats.accepted,
    )
    assert speculation.policy == "fixed" and sum(speculation.k_histogram.values()) == finished.stats.rounds
