"""Pipelined drafting in the core: the block drafted ahead is exactly the block a fresh round would draft
from the same request (tests/unit/test_session.py checks the guessed request itself)."""

import pytest

from eesd.drafter import Drafter, DraftStopped
from eesd.params import PolicyParams, SamplingParams
from eesd.rounds import DraftRequest

PROMPT = [3, 17, 42, 99, 7, 250, 31]


def request(policy: str = "beta-ts", sampling: SamplingParams | None = None, max_tokens: int = 40) -> DraftRequest:
    return DraftRequest(
        "s", 0, 0, PROMPT, max_tokens, 1234, sampling or SamplingParams(), PolicyParams(policy, k_max=4), {}
    )


@pytest.fixture(scope="module")
def drafter(tiny_models):
    return Drafter(tiny_models["llama"], 3)  # N = L-1: drafts agree with the model often


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
