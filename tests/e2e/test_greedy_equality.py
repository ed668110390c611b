"""Greedy equality through the whole distributed stack: every draft policy, two architectures (llama;
qwen2 with grouped-query attention), two exit layers N (1 and L-1), with and without pipelined drafting,
equals HF generate(do_sample=False)."""

import pytest
from eesd_client import EesdClient, FinishReason

from loadtest.scrape import P, scrape
from tests.e2e.helpers import EOS, POLICIES, oracle, start_stack, stop_stack

NUM_LAYERS = 4  # eesd.tiny checkpoints
MAX_NEW = 40
PROMPTS = ([5], [(7 * i + 3) % 380 + 3 for i in range(40)])
# (arch, N, Redis state store?, pipelined drafting?); (llama, 1) is the session's main stack (2 drafters,
# 2 verifiers, Redis).
STACKS = [
    ("llama", 1, True, True),
    ("llama", NUM_LAYERS - 1, False, True),
    ("llama", NUM_LAYERS - 1, False, False),
    ("qwen2", 1, False, True),
    ("qwen2", NUM_LAYERS - 1, True, True),
]
STACK_IDS = [f"{a}-N{n}{'-redis' if r else ''}{'' if p else '-unpipelined'}" for a, n, r, p in STACKS]


@pytest.fixture(scope="module", params=STACKS, ids=STACK_IDS)
def greedy_stack(request, tiny_models, tmp_path_factory):
    arch, exit_layer, redis, pipeline = request.param
    if (arch, exit_layer) == ("llama", 1):
        yield request.getfixturevalue("main_stack"), tiny_models[arch]
        return
    if redis:
        request.getfixturevalue("require_redis")
    stack = start_stack(
        tiny_models[arch],
        exit_layer,
        tmp_path_factory.mktemp(f"{arch}-N{exit_layer}"),
        redis=redis,
        drafter_args=() if pipeline else ("--pipeline", "false"),
    )
    yield stack, tiny_models[arch]
    stop_stack(stack)


def pipelined(stack) -> bool:
    return "--pipeline" not in stack.by_role("drafter")[0].args


def exit_layer_of(stack) -> int:
    args = stack.by_role("drafter")[0].args
    return int(args[args.index("--exit-layer") + 1])


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_matches_hf_greedy(greedy_stack, policy):
    stack, model_dir = greedy_stack
    with EesdClient(stack.controller_address, timeout=120) as client:
        for prompt in PROMPTS:
            result = client.generate_text(prompt, max_new_tokens=MAX_NEW, policy=policy, k_max=5, stop_on_eos=False)
            assert result.token_ids == oracle(model_dir, prompt, MAX_NEW), (policy, prompt)
            assert result.finish_reason == FinishReason.LENGTH
            assert result.stats.usage.completion_tokens == MAX_NEW
            assert result.stats.speculation.policy == policy
            if policy == "off":
                assert result.stats.speculation.drafted == 0 and len(result.rounds) == MAX_NEW
            else:
                assert result.stats.speculation.drafted > 0


def test_stops_at_eos_like_hf(greedy_stack):
    """With stop_on_eos the controller stops at the checkpoint's EOS id exactly where HF does."""
    stack, model_dir = greedy_stack
    prompt = PROMPTS[1]
    expected = oracle(model_dir, prompt, MAX_NEW, eos_token_id=EOS)
    with EesdClient(stack.controller_address, timeout=120) as client:
        result = client.generate_text(prompt, max_new_tokens=MAX_NEW, policy="fixed", k_max=4)
    assert result.token_ids == expected
    reason = FinishReason.EOS if EOS in expected else FinishReason.LENGTH
    assert result.finish_reason == reason


def test_fixed_k_rounds_and_acceptance(greedy_stack):
    """Fixed k=4 drafts 4 per round. At N = L-1 the untrained exit layer is a copy of the last layer, so the
    drafter is the model: every draft is accepted (6 rounds of 4 drafts + bonus, then 2 drafts + bonus), and
    with pipelined drafting its guess of each next round holds, so rounds 1-6 take the block drafted ahead."""
    stack, model_dir = greedy_stack
    drafters = [n.metrics_url for n in stack.by_role("drafter")]
    before = scrape(drafters)
    with EesdClient(stack.controller_address, timeout=120) as client:
        result = client.generate_text([9, 8, 7], max_new_tokens=33, policy="fixed", k_max=4, stop_on_eos=False)
    lookaheads = {
        outcome: (scrape(drafters) - before).total(P + "drafter_lookaheads_total", outcome=outcome)
        for outcome in ("used", "dropped", "skipped")
    }
    assert result.token_ids == oracle(model_dir, [9, 8, 7], 33)
    assert all(
        r.k_chosen == min(4, 33 - 1 - sum(p.committed for p in result.rounds[:i])) for i, r in enumerate(result.rounds)
    )
    if not pipelined(stack):
        assert sum(lookaheads.values()) == 0
    elif exit_layer_of(stack) == NUM_LAYERS - 1:
        assert result.stats.speculation.accepted == result.stats.speculation.drafted
        assert len(result.rounds) == 7
        assert lookaheads == {"used": 6, "dropped": 0, "skipped": 0}
    else:  # every drafting round but the first settles the lookahead of the round before
        assert sum(lookaheads.values()) == sum(r.drafted > 0 for r in result.rounds) - 1
