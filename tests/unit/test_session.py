"""eesd.session: one session's round transition, the same for the engine, the controller and the drafter's
lookahead."""

import pytest

from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.policies import POLICIES, make_policy
from eesd.rounds import DraftBlock, Verdict
from eesd.session import NO_DRAFT, Session, drafter_cache_after, next_draft_request

PROMPT = [3, 17, 42, 99, 7, 250, 31]
EOS = 2


def session(policy: str = "beta-ts", k_max: int = 4, max_new_tokens: int = 41, stop_on_eos: bool = True) -> Session:
    params = GenerationParams(max_new_tokens, SamplingParams(), PolicyParams(policy, k_max), stop_on_eos)
    return Session.start("s", PROMPT, params, seed=1234, eos_token_ids=frozenset({EOS}))


def settle_and_apply(s: Session, block: DraftBlock, accepted: int, next_token: int):
    fed = len(s.committed)
    verdict = Verdict("s", s.round_index, accepted, next_token, fed + accepted)
    drafter_length = None if block is NO_DRAFT else drafter_cache_after(block, fed, accepted)
    result = s.settle(block, verdict, drafter_length, 0.0, 0.0)
    s.apply(result)
    return result


def test_a_round_commits_accepted_plus_one_and_moves_both_caches():
    s = session()
    request = s.draft_request(base=0)
    assert (request.round_index, request.base_length, request.pending, request.max_tokens) == (0, 0, PROMPT, 40)
    block = DraftBlock([5, 6, 7], [0.9, 0.8, 0.7], budget=4, cache_length=len(PROMPT) + 2)
    result = settle_and_apply(s, block, accepted=1, next_token=11)
    assert result.tokens == s.generated == [5, 11]
    assert (s.verifier_length, s.drafter_length) == (len(PROMPT) + 1, len(PROMPT) + 1)  # the recovered token pends
    expected = make_policy(PolicyParams("beta-ts", 4))
    expected.update([0.9, 0.8, 0.7], 1)
    assert s.policy_state == expected.state()
    assert (s.round_index, s.stats.drafted, s.stats.accepted, s.finish_reason) == (1, 3, 1, None)
    nxt = s.draft_request(base=min(s.drafter_length, s.verifier_length))
    assert (nxt.round_index, nxt.pending, nxt.max_tokens) == (1, [11], 38)


def test_settle_changes_nothing_until_applied():
    s = session()
    block = DraftBlock([5], [0.9], budget=1, cache_length=len(PROMPT))
    s.settle(block, Verdict("s", 0, 1, 11, len(PROMPT) + 1), len(PROMPT) + 1, 0.0, 0.0)
    assert (s.committed, s.round_index, s.policy_state) == (PROMPT, 0, session().policy_state)


def test_eos_and_length_end_the_session():
    s = session()
    block = DraftBlock([5, EOS, 7], [0.9, 0.8, 0.7], budget=3, cache_length=len(PROMPT) + 2)
    assert settle_and_apply(s, block, accepted=3, next_token=11).tokens == [5, EOS]
    assert s.finish_reason == "eos"
    s = session(max_new_tokens=2)
    assert s.draft_room == 1
    settle_and_apply(s, DraftBlock([5], [0.9], budget=1, cache_length=len(PROMPT)), accepted=1, next_token=6)
    assert (s.generated, s.finish_reason) == ([5, 6], "length")


@pytest.mark.parametrize(("policy", "k_max"), [("off", 8), ("beta-ts", 0)])
def test_no_speculation_means_no_draft_room(policy, k_max):
    """Speculation off by name or by k_max = 0: the same rule everywhere (the engine used to call the
    drafter with k_max = 0 while the controller did not)."""
    s = session(policy, k_max)
    assert not s.speculates and s.draft_room == 0
    result = settle_and_apply(s, NO_DRAFT, accepted=0, next_token=11)
    assert result.tokens == [11] and s.policy_state == session(policy, k_max).policy_state


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"off"}))
def test_next_draft_request_is_the_sessions_next_request(policy):
    """The drafter's guess for round r+1 (accept all, then the bonus) is exactly the request the session
    makes after that verdict."""
    s = session(policy)
    first = s.draft_request(base=0)
    block = DraftBlock([5, 6, 7], [0.9, 0.8, 0.7], budget=4, cache_length=len(PROMPT) + 2)
    guess = next_draft_request(first, block, bonus=11)
    fed = len(s.committed)
    s.apply(s.settle(block, Verdict("s", 0, 3, 11, fed + 3), block.cache_length + 1, 0.0, 0.0))  # lookahead fed
    assert guess == s.draft_request(base=min(s.drafter_length, s.verifier_length))
    # The caller's measured overhead travels with a request but is no part of what a guess must match.
    assert guess == s.draft_request(min(s.drafter_length, s.verifier_length), round_overhead_s=0.004)
    assert guess.base_length == len(PROMPT) + 3 and guess.pending == [11]


def test_no_next_draft_request_without_room():
    block = DraftBlock([5, 6, 7], [0.9, 0.8, 0.7], budget=3, cache_length=len(PROMPT) + 2)
    assert next_draft_request(session(max_new_tokens=5).draft_request(0), block, bonus=11) is None
    assert next_draft_request(session(max_new_tokens=6).draft_request(0), block, bonus=11).max_tokens == 1


def test_a_seeded_sampled_session_is_not_load_aware():
    """A load-aware k depends on the load and a sampled round's draws on its k: a client seed must give the
    same tokens whatever the session is batched with, so it turns load awareness off; greedy keeps it."""
    aware = PolicyParams("beta-ts", 4, {"load_aware": 1.0, "alpha": 2.0})
    seeded = GenerationParams(8, SamplingParams(temperature=0.7, seed=3), aware)
    assert Session.start("s", PROMPT, seeded, 3).params.policy.options == {"alpha": 2.0}
    for kept in (GenerationParams(8, SamplingParams(), aware), GenerationParams(8, SamplingParams(0.7), aware)):
        assert Session.start("s", PROMPT, kept, 3).params.policy == aware


def test_a_drafter_round_without_drafts_still_moves_the_drafters_cache():
    """A load-aware drafter that chooses k = 0 feeds the pending tokens anyway, so its cache keeps up; a
    verifier-only round leaves the drafter's cache where it was."""
    s = session()
    fed = len(s.committed)
    empty = DraftBlock([], [], budget=0, cache_length=fed)
    settle_and_apply(s, empty, accepted=0, next_token=11)
    assert (s.drafter_length, s.verifier_length) == (fed, fed)
    settle_and_apply(s, NO_DRAFT, accepted=0, next_token=12)
    assert (s.drafter_length, s.verifier_length) == (fed, fed + 1)
