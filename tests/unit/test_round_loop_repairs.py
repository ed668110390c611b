"""The controller's repair paths, fast: RoundLoop driving in-process drafters and verifiers (eesd.Drafter and
eesd.Verifier on a tiny fp32 model) through a NodeClients stand-in that can take a node down or wipe its
caches between rounds. Every scenario must still produce the model's plain greedy output."""

import asyncio
import time
from collections.abc import Callable

import pytest

from controller.discovery import StaticDiscovery
from controller.nodes import Mismatch, RoundOutcome
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import MemoryStateStore
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import NotFound, ResourceExhausted, Unavailable
from eesd.kv_cache import CacheBehind
from eesd.params import GenerationParams, PolicyParams, session_key
from eesd.rounds import DraftRequest, VerifyRequest
from eesd.session import drafter_cache_after
from eesd.verifier import Verifier

PROMPT = [5, 9, 33, 71, 2, 140, 7]
PARAMS = GenerationParams(40, policy=PolicyParams("fixed", k_max=3), stop_on_eos=False)


class InProcessNodes:
    """NodeClients over in-process models. `before_round(round_index, nodes)` runs before each call, so a
    scenario can kill a node (its address answers UNAVAILABLE) or wipe its caches (a restart)."""

    def __init__(self, models: dict[str, Drafter | Verifier], before_round: Callable[[int, "InProcessNodes"], None]):
        self.models, self.before_round, self.down = models, before_round, set()
        self.calls: list[tuple[str, str]] = []  # (drafter or "-", verifier) of every round call

    def _model(self, role: str, address: str):
        if address in self.down:
            raise Unavailable(f"{role} {address} is down", peer=role)
        return self.models[address]

    def restart(self, address: str) -> None:
        wipe(self.models[address])

    async def draft(self, drafter: str, request: DraftRequest, verifier: str) -> RoundOutcome | Mismatch:
        self.before_round(request.round_index, self)
        self.calls.append((drafter, verifier))
        try:
            block = self._model("drafter", drafter).propose(request)
        except CacheBehind as behind:
            return Mismatch("drafter", behind.cache_length)
        try:
            verdict = self._model("verifier", verifier).verify(request.verify_request(block))
        except CacheBehind as behind:
            return Mismatch("verifier", behind.cache_length)
        fed = request.base_length + len(request.pending)
        return RoundOutcome(block, verdict, drafter_cache_after(block, fed, verdict.accepted), 0.0, 0.0, 0.0)

    async def verify(self, verifier: str, request: VerifyRequest) -> RoundOutcome | Mismatch:
        self.before_round(request.round_index, self)
        self.calls.append(("-", verifier))
        try:
            verdict = self._model("verifier", verifier).verify(request)
        except CacheBehind as behind:
            return Mismatch("verifier", behind.cache_length)
        return RoundOutcome(request.draft, verdict, None, 0.0, 0.0, 0.0)

    async def open_session(self, role, address, session_id, owner, reserve_tokens) -> int:
        model, key = self._model(role, address), session_key(session_id, owner)
        try:
            return model.sessions.get(key).length
        except LookupError:
            return model.sessions.open(key, reserve_tokens).length

    async def prefill(self, role, address, session_id, owner, round_index, base_length, token_ids) -> int | Mismatch:
        model = self._model(role, address)
        try:
            cache = model.sessions.at_base(session_key(session_id, owner), base_length, token_ids)
        except CacheBehind as behind:
            return Mismatch(role, behind.cache_length)
        model.stack(token_ids, cache, len(token_ids) - 1)
        return cache.length

    async def close_session(self, role, address, session_id, owner) -> None:
        self.models[address].sessions.close(session_key(session_id, owner))


def wipe(model: Drafter | Verifier) -> None:
    """Closes every session the node holds, as a restart would."""
    for key in model.sessions:
        model.sessions.close(key)


@pytest.fixture(scope="module")
def models(tiny_models):
    path = tiny_models["llama"]
    return {
        "d1:1": Drafter(path, 2),
        "d2:1": Drafter(path, 2),
        "v1:1": Verifier(path),
        "v2:1": Verifier(path),
    }


@pytest.fixture(scope="module")
def reference(models):
    plain = GenerationParams(PARAMS.max_new_tokens, policy=PolicyParams("off"), stop_on_eos=False)
    return SpeculativeEngine(None, models["v1:1"]).generate(PROMPT, plain).token_ids


def run(models, drafters: str, before_round) -> tuple[list[int], InProcessNodes]:
    async def scenario():
        nodes = InProcessNodes(models, before_round)
        router = Router(StaticDiscovery(drafters), StaticDiscovery("v1:1,v2:1"), down_s=60.0)
        loop = RoundLoop(MemoryStateStore(), router, nodes, frozenset(), vocab_size=384, unavailable_wait_s=5.0)
        tokens = []
        async for event in loop.generate(PROMPT, PARAMS, "s"):
            if isinstance(event, RoundEvent):
                tokens += event.tokens
            else:
                assert isinstance(event, Finished) and event.finish_reason == "length"
        await loop.aclose()
        return tokens, nodes

    for model in models.values():
        wipe(model)
    return asyncio.run(scenario())


def at_round(n: int, action: Callable[[InProcessNodes], None]):
    def before_round(round_index: int, nodes: InProcessNodes) -> None:
        if round_index == n and not getattr(before_round, "done", False):
            before_round.done = True
            action(nodes)

    return before_round


def test_no_fault(models, reference):
    tokens, nodes = run(models, "d1:1", lambda r, n: None)
    assert tokens == reference
    assert set(nodes.calls) <= {("d1:1", "v1:1"), ("-", "v1:1")}  # "-": a last round with no room to draft


def test_verifier_lost_moves_to_the_other_verifier(models, reference):
    tokens, nodes = run(models, "d1:1", at_round(3, lambda n: n.down.add("v1:1")))
    assert tokens == reference
    assert ("d1:1", "v1:1") in nodes.calls and nodes.calls[-2] == ("d1:1", "v2:1")


def test_drafter_lost_moves_to_the_other_drafter(models, reference):
    tokens, nodes = run(models, "d1:1,d2:1", at_round(3, lambda n: n.down.add("d1:1")))
    assert tokens == reference
    assert ("d1:1", "v1:1") in nodes.calls and nodes.calls[-2] == ("d2:1", "v1:1")


def test_last_drafter_lost_falls_back_to_verifier_only(models, reference):
    tokens, nodes = run(models, "d1:1", at_round(2, lambda n: n.down.add("d1:1")))
    assert tokens == reference
    assert nodes.calls[-3:] == [("-", "v1:1")] * 3


@pytest.mark.parametrize("address", ["v1:1", "d1:1"])
def test_node_that_lost_its_caches_is_prefilled(models, reference, address, caplog):
    """A restart (the address answers, its caches are gone): the cache-behind answer leads to a prefill."""
    role = "verifier" if address.startswith("v") else "drafter"
    with caplog.at_level("INFO", logger="controller.round_loop"):
        tokens, nodes = run(models, "d1:1", at_round(3, lambda n: n.restart(address)))
    assert tokens == reference
    assert f"round 3: {role} cache holds 0 tokens" in caplog.text
    assert set(nodes.calls) <= {("d1:1", "v1:1"), ("-", "v1:1")}  # repaired in place, no node replaced


def admission_scene(models, verifier_tokens: int, drafter_tokens: int, admission_wait_s: float):
    """Both nodes' pools resized; returns (loop, store, nodes). PARAMS reserve 7 + 40 -> 48 positions."""
    models = dict(models)
    for address, tokens in (("v1:1", verifier_tokens), ("d1:1", drafter_tokens)):
        models[address].sessions = models[address].stack.new_pool(kv_tokens=tokens)
    nodes, store = InProcessNodes(models, lambda r, n: None), MemoryStateStore()
    router = Router(StaticDiscovery("d1:1"), StaticDiscovery("v1:1"))
    loop = RoundLoop(store, router, nodes, frozenset(), 384, admission_wait_s=admission_wait_s)
    return loop, store, nodes


async def tokens_of(loop: RoundLoop, session_id: str) -> list[int]:
    tokens = []
    async for event in loop.generate(PROMPT, PARAMS, session_id):
        if isinstance(event, RoundEvent):
            tokens += event.tokens
            await asyncio.sleep(0)  # let the other session's admission look in between rounds
    return tokens


@pytest.fixture
def own_models(tiny_models):
    """Models whose pools the admission tests may resize."""
    path = tiny_models["llama"]
    return {"d1:1": Drafter(path, 2), "v1:1": Verifier(path)}


def test_a_session_waits_for_kv_room_then_runs(own_models, reference):
    async def scenario():
        loop, _, _ = admission_scene(own_models, 48, 96, admission_wait_s=60.0)
        return await asyncio.gather(tokens_of(loop, "a"), tokens_of(loop, "b"))

    first, second = asyncio.run(scenario())
    assert first == second == reference  # the second waited for the first's positions, then ran whole


def test_no_kv_room_within_the_wait_is_resource_exhausted_before_any_token(own_models, reference):
    async def scenario():
        loop, store, _ = admission_scene(own_models, 48, 96, admission_wait_s=0.2)
        own_models["v1:1"].sessions.open("squatter", 48)  # the only room, held for longer than the wait
        with pytest.raises(ResourceExhausted, match="no verifier could hold this session's 47 KV positions"):
            await tokens_of(loop, "late")
        with pytest.raises(NotFound):  # refused before anything was stored: a retry with the same id works
            await store.get_session("late")
        own_models["v1:1"].sessions.close("squatter")
        return await tokens_of(loop, "late")

    assert asyncio.run(scenario()) == reference


def test_a_drafter_without_room_leaves_the_session_verifier_only(own_models, reference):
    async def scenario():
        loop, _, nodes = admission_scene(own_models, 96, 16, admission_wait_s=0.2)
        return await tokens_of(loop, "s"), nodes

    tokens, nodes = asyncio.run(scenario())
    assert tokens == reference
    assert {drafter for drafter, _ in nodes.calls} == {"-"}


def test_a_session_waits_for_a_verifier_to_be_ready_then_runs(models, reference):
    """No verifier is ready when the session arrives (starting, or found lost by the health probes): it
    waits, within admission_wait_s, instead of failing UNAVAILABLE at once."""

    async def scenario():
        ready_at = time.monotonic() + 0.3
        nodes = InProcessNodes(models, lambda r, n: None)
        router = Router(
            StaticDiscovery("d1:1"), StaticDiscovery("v1:1"), lost=lambda address: time.monotonic() < ready_at
        )
        loop = RoundLoop(MemoryStateStore(), router, nodes, frozenset(), 384, admission_wait_s=10.0)
        return await tokens_of(loop, "s")

    for model in models.values():
        wipe(model)
    assert asyncio.run(scenario()) == reference
