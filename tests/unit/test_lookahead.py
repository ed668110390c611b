"""Pipelined drafting in the core: the guessed next request mirrors the round loop, and the block drafted
ahead is exactly the block a fresh round would draft from the same request."""

import pytest

from eesd.drafter import Drafter, DraftStopped, next_round
from eesd.params import PolicyParams, SamplingParams
from eesd.policies import POLICIES, make_policy
from eesd.rounds import DraftBlock, DraftRequest

PROMPT = [3, 17, 42, 99, 7, 250, 31]


def request(policy: str = "beta-ts", sampling: SamplingParams | None = None, max_tokens: int = 40) -> DraftRequest:
    return DraftRequest(
        "s", 0, 0, PROMPT, max_tokens, 1234, sampling or SamplingParams(), PolicyParams(policy, k_max=4), {}
    )


@pytest.fixture(scope="module")
def drafter(tiny_models):
    return Drafter(tiny_models["llama"], 3)  # N = L-1: drafts agree with the model often


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"off"}))
def test_next_round_mirrors_the_round_loop(policy):
    first = request(policy)
    block = DraftBlock([5, 6, 7], [0.9, 0.8, 0.7], budget=4, cache_length=len(PROMPT) + 2)
    guess = next_round(first, block, bonus=11)
    controller_policy = make_policy(first.policy, first.policy_state)
    controller_policy.update(block.confidences, accepted=3)
    assert guess.round_index == 1
    assert guess.base_length == len(PROMPT) + 3  # everything but the bonus token, as both caches hold it
    assert guess.pending == [11]
    assert guess.max_tokens == first.max_tokens - 4  # k drafts + the bonus committed
    assert guess.policy_state == controller_policy.state()
    assert (guess.seed, guess.sampling, guess.policy) == (first.seed, first.sampling, first.policy)


def test_no_next_round_without_room():
    block = DraftBlock([5, 6, 7], [0.9, 0.8, 0.7], budget=3, cache_length=len(PROMPT) + 2)
    assert next_round(request(max_tokens=4), block, bonus=11) is None
    assert next_round(request(max_tokens=5), block, bonus=11).max_tokens == 1


@pytest.fixture
def session(drafter):
    drafter.sessions.open("s")
    yield drafter.sessions
    drafter.sessions.close("s")


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=50)], ids=str)
def test_block_drafted_ahead_equals_a_fresh_round(drafter, session, sampling):
    first = request("fixed", sampling)
    block = drafter.propose(first)
    guess = drafter.lookahead(first, block)
    assert session.get("s").length == block.cache_length + 1 == guess.base_length
    ahead = drafter.propose(guess)
    # A fresh round (lookahead skipped or dropped) rolls the cache back to the same base and drafts again.
    assert drafter.propose(guess) == ahead
    assert ahead.tokens


def test_lookahead_refuses_a_cache_that_moved_on(drafter, session):
    first = request("fixed")
    block = drafter.propose(first)
    session.get("s").crop(3)
    with pytest.raises(DraftStopped):
        drafter.lookahead(first, block)


def test_lookahead_stopped_before_it_feeds(drafter, session):
    first = request("fixed")
    block = drafter.propose(first)
    with pytest.raises(DraftStopped):
        drafter.lookahead(first, block, stop=lambda: True)
    assert session.get("s").length == block.cache_length


def test_stop_ends_drafting(drafter, session):
    with pytest.raises(DraftStopped):
        drafter.propose(request("fixed"), stop=lambda: True)
    # A stopped draft leaves a cache the next round rolls back from.
    assert drafter.propose(request("fixed")).tokens
