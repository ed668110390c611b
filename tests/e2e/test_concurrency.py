"""Many concurrent sessions through one stack (asyncio client): each equals its own oracle, the sessions
spread over both drafters and both verifiers (GetSession names each session's nodes), and the nodes
batched them: passes held several sessions at once (continuous batching)."""

import asyncio
from collections import Counter

from eesd_client import AsyncEesdClient, SessionState

from loadtest.scrape import P, scrape
from tests.e2e.helpers import POLICIES, oracle

SESSIONS = 20
MAX_NEW = 24


def prompt_of(i: int) -> list[int]:
    return [(31 * i + 7 * j + 5) % 380 + 3 for j in range(1 + i % 9)]


async def run_all(address: str) -> list:
    async with AsyncEesdClient(address, timeout=180) as client:
        results = await asyncio.gather(
            *(
                client.generate_text(
                    prompt_of(i),
                    max_new_tokens=MAX_NEW,
                    policy=POLICIES[i % len(POLICIES)],
                    k_max=4,
                    stop_on_eos=False,
                )
                for i in range(SESSIONS)
            )
        )
        infos = await asyncio.gather(*(client.get_session(r.session_id, include_token_ids=True) for r in results))
    return list(zip(results, infos, strict=True))


def batched_passes(main_stack, role: str) -> tuple[float, float]:
    """(passes, passes with one session) of the role's nodes so far, from their node_batch_size histograms."""
    samples = scrape([n.metrics_url for n in main_stack.by_role(role)])
    count = samples.total(P + "node_batch_size_count", role=role)
    return count, samples.total(P + "node_batch_size_bucket", role=role, le="1.0")


def test_concurrent_sessions_are_all_correct_and_spread_over_nodes(main_stack, main_model):
    expected = [oracle(main_model, prompt_of(i), MAX_NEW) for i in range(SESSIONS)]
    before = {role: batched_passes(main_stack, role) for role in ("drafter", "verifier")}
    outcomes = asyncio.run(run_all(main_stack.controller_address))
    assert len({result.session_id for result, _ in outcomes}) == SESSIONS
    for i, (result, info) in enumerate(outcomes):
        assert result.token_ids == expected[i], (i, POLICIES[i % len(POLICIES)])
        assert info.state == SessionState.FINISHED
        # The committed tokens in the state store (Redis) are exactly the prompt plus what was streamed.
        assert info.committed_token_ids == tuple(prompt_of(i)) + expected[i]
        assert info.usage.completion_tokens == MAX_NEW
    # Least-loaded routing spreads the burst: each node serves a fair share (the sessions overlap).
    drafters = Counter(info.drafter_id for result, info in outcomes if result.stats.speculation.policy != "off")
    verifiers = Counter(info.verifier_id for _, info in outcomes)
    for served, role in ((drafters, "drafter"), (verifiers, "verifier")):
        assert set(served) == {n.address for n in main_stack.by_role(role)}, served
        assert min(served.values()) >= served.total() / 4, served
    for role in ("drafter", "verifier"):  # some passes held more than one session
        passes, single = (now - then for now, then in zip(batched_passes(main_stack, role), before[role], strict=True))
        assert passes > single, role
