"""The drafter node's lookaheads (drafter_service.lookahead) on a real Drafter, without gRPC: a right guess
is sent ahead and taken, a wrong one is dropped, and a busy node owes step 1 to the next round, which
then drafts exactly the block an idle node drafted ahead (the output never depends on timing)."""

import asyncio
from dataclasses import replace

import pytest

from drafter_service.lookahead import Lookaheads
from eesd.drafter import Drafter
from eesd.params import PolicyParams, SamplingParams
from eesd.rounds import DraftBlock, DraftRequest
from serving.node import ModelNode

PROMPT = [3, 17, 42, 99, 7, 250, 31]


def first_request(session: str) -> DraftRequest:
    return DraftRequest(
        session, 0, 0, PROMPT, 40, 7, SamplingParams(temperature=0.8), PolicyParams("fixed", k_max=3), {}
    )


class Sent:
    """Records what a lookahead sends to the verifier, answering with a marker."""

    def __init__(self):
        self.rounds: list[tuple[DraftRequest, DraftBlock]] = []

    async def __call__(self, request: DraftRequest, block: DraftBlock):
        self.rounds.append((request, block))
        return f"answer {request.round_index}"


@pytest.fixture(scope="module")
def drafter(tiny_models):
    return Drafter(tiny_models["llama"], 3)


async def scene(drafter: Drafter) -> tuple[ModelNode, Lookaheads, Sent]:
    node = ModelNode("test-drafter", "drafter")
    await node.load(lambda: drafter)
    return node, Lookaheads(node), Sent()


async def round_zero(node: ModelNode, session: str) -> tuple[DraftRequest, DraftBlock]:
    request = first_request(session)
    node.model.sessions.open(session)
    return request, await node.run(node.model.propose, request)


async def drafting_ahead(node: ModelNode, lookaheads: Lookaheads, sent: Sent, session: str):
    """Round 0 of `session` sent out and its lookahead started: (request, block, guessed round 1)."""
    request, block = await round_zero(node, session)
    lookaheads.start(request, block, "verifier:1", sent)
    return request, block, await lookaheads._sessions[session][1].guess


def test_right_guess_is_sent_ahead_and_taken(drafter):
    async def scenario():
        node, lookaheads, sent = await scene(drafter)
        request, _, guess = await drafting_ahead(node, lookaheads, sent, "a")
        assert await lookaheads.settle(request, accepted_all=True, next_token=guess.pending[0])
        ahead = await lookaheads.take(guess, "verifier:1")
        assert ahead is not None and await ahead.answer == "answer 1"
        assert sent.rounds == [(guess, ahead.block)]
        assert ahead.block == await node.run(node.model.propose, guess)  # what a fresh round drafts
        await lookaheads.drop("a")
        node.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("failure", ["rejected", "other bonus", "other verifier"])
def test_wrong_guess_is_dropped(drafter, failure):
    async def scenario():
        node, lookaheads, sent = await scene(drafter)
        request, _, guess = await drafting_ahead(node, lookaheads, sent, "b")
        bonus = guess.pending[0] + (failure == "other bonus")
        covers = await lookaheads.settle(request, accepted_all=failure != "rejected", next_token=bonus)
        assert covers == (failure != "rejected")
        if failure == "other verifier":  # the controller moved the session after round 0
            await asyncio.sleep(0.2)  # let the block go out first: it is dropped all the same
            assert await lookaheads.take(guess, "verifier:2") is None
            assert len(sent.rounds) == 1
        else:  # the controller's round 1 is not the guessed one
            assert await lookaheads.take(replace(guess, pending=[bonus + 1]), "verifier:1") is None
            assert sent.rounds == []
        assert lookaheads._sessions == {}
        node.shutdown()

    asyncio.run(scenario())


def test_busy_node_owes_step_one_and_drafts_the_same_block(drafter):
    async def scenario():
        node, lookaheads, sent = await scene(drafter)
        request, block, guess = await drafting_ahead(node, lookaheads, sent, "idle")
        await lookaheads.settle(request, accepted_all=True, next_token=guess.pending[0])
        ahead = await lookaheads.take(guess, "verifier:1")

        busy_request, busy_block = await round_zero(node, "busy")
        assert busy_block == block
        node.queued += 1  # another session's call is waiting: no step 1 ahead
        lookaheads.start(busy_request, busy_block, "verifier:1", sent)
        node.queued -= 1
        assert node.model.sessions.get("busy").length == busy_block.cache_length
        assert await lookaheads.settle(busy_request, accepted_all=True, next_token=guess.pending[0])
        busy_guess = replace(guess, session_id="busy")
        assert await lookaheads.take(busy_guess, "verifier:1") is None  # feeds the owed draft, drafts nothing
        assert node.model.sessions.get("busy").length == busy_guess.base_length
        fresh = await node.run(node.model.propose, busy_guess)
        assert fresh == ahead.block
        assert len(sent.rounds) == 1
        await lookaheads.drop("idle")
        node.shutdown()

    asyncio.run(scenario())


def test_a_load_aware_block_is_sized_by_the_nodes_measured_cost_and_pooled_verdicts(drafter):
    """The node's sizing reaches the policy: at the same draft cost, a pool of verdicts that all kept their
    drafts makes a load-aware session draft its whole k_max, one that rejected them all makes it draft none."""
    aware = PolicyParams("beta-ts", k_max=5, options={"load_aware": 1.0})

    async def scenario():
        node = ModelNode("test-drafter", "drafter")
        await node.load(lambda: drafter)
        budgets = {}
        for name, pooled in (("kept", (6000.0, 0.0)), ("rejected", (0.0, 6000.0))):
            lookaheads = Lookaheads(node, sizing=lambda request, verifier, pooled=pooled: (0.2, pooled))
            request = replace(first_request(name), sampling=SamplingParams(), policy=aware)
            node.model.sessions.open(name)
            budgets[name] = (await lookaheads.propose(request, "verifier:1")).budget
        assert budgets == {"kept": 5, "rejected": 0}
        node.shutdown()

    asyncio.run(scenario())
