"""The controller's repair paths, fast: RoundLoop driving in-process drafters and verifiers (eesd.Drafter and
eesd.Verifier on a tiny fp32 model) through a NodeClients stand-in that can take a node down or wipe its
caches between rounds. Every scenario must still produce the model's plain greedy output."""

import asyncio
from collections.abc import Callable

import pytest

from controller.discovery import StaticDiscovery
from controller.nodes import Mismatch, RoundOutcome
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import MemoryStateStore
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import Unavailable
from eesd.kv_cache import CacheBehind
from eesd.params import GenerationParams, PolicyParams
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
        self.models[address].sessions.close("s")  # the only session these tests run

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
        return RoundOutcome(request.draft, verdict, 0, 0.0, 0.0, 0.0)

    async def prefill(self, role, address, session_id, round_index, base_length, token_ids) -> int | Mismatch:
        model = self._model(role, address)
        try:
            cache = model.sessions.at_base(session_id, base_length, token_ids)
        except CacheBehind as behind:
            return Mismatch(role, behind.cache_length)
        model.stack(token_ids, cache, len(token_ids) - 1)
        return cache.length

    async def close_session(self, role, address, session_id) -> None:
        self.models[address].sessions.close(session_id)


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
        model.sessions.close("s")
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
