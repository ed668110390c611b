"""The in-process engine: draft -> verify -> commit rounds on one drafter and one verifier.

The distributed controller runs the same round over gRPC; both keep only the committed tokens and the
policy state as hard state, and tell each node which committed prefix its cache must cover.
"""

import secrets
import time
import uuid
from collections.abc import Callable

from eesd.drafter import Drafter
from eesd.generation import GenerationResult, GenerationStats, finish
from eesd.params import GenerationParams, validate_prompt
from eesd.policies import make_policy
from eesd.rounds import DraftBlock, DraftRequest, RoundStats, VerifyRequest
from eesd.verifier import Verifier


class SpeculativeEngine:
    def __init__(self, drafter: Drafter | None, verifier: Verifier, eos_token_ids: frozenset[int] = frozenset()):
        if drafter is not None:
            drafter.identity.check_pairs_with(verifier.identity)
        self.drafter, self.verifier = drafter, verifier
        self.eos_token_ids = frozenset(eos_token_ids)

    def generate(
        self, prompt_ids: list[int], params: GenerationParams, on_tokens: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        params.validate()
        validate_prompt(prompt_ids, self.verifier.config.vocab_size)
        seed = params.sampling.seed if params.sampling.seed is not None else secrets.randbits(63)
        session = uuid.uuid4().hex
        speculate = self.drafter is not None and params.policy.name != "off"
        policy = make_policy(params.policy)
        committed, generated = list(prompt_ids), 0
        drafter_length = verifier_length = 0  # committed tokens each node's cache covers
        stats, start, finish_reason = GenerationStats(), time.perf_counter(), None
        try:
            while finish_reason is None:
                round_index, t0 = stats.rounds, time.perf_counter()
                block = DraftBlock([], [])
                # Every round commits one token past the drafts, so draft at most remaining - 1.
                room = params.max_new_tokens - generated - 1
                if speculate and room > 0:
                    block = self.drafter.propose(
                        DraftRequest(
                            session,
                            round_index,
                            drafter_length,
                            committed[drafter_length:],
                            room,
                            seed,
                            params.sampling,
                            params.policy,
                            policy.state(),
                        )
                    )
                t1 = time.perf_counter()
                verdict = self.verifier.verify(
                    VerifyRequest(
                        session, round_index, verifier_length, committed[verifier_length:], block, seed, params.sampling
                    )
                )
                t2 = time.perf_counter()
                if block.tokens:
                    policy.update(block.confidences, verdict.accepted)
                    drafter_length = min(block.cache_length, len(committed) + verdict.accepted)
                verifier_length = verdict.cache_length
                new_tokens, finish_reason = finish(
                    verdict.committed_tokens(block), generated, params, self.eos_token_ids
                )
                committed += new_tokens
                generated += len(new_tokens)
                stats.add(
                    RoundStats(
                        round_index,
                        block.budget,
                        len(block.tokens),
                        verdict.accepted,
                        len(new_tokens),
                        t1 - t0,
                        t2 - t1,
                    )
                )
                if on_tokens is not None:
                    on_tokens(new_tokens)
        finally:
            for node in (self.drafter, self.verifier):
                if node is not None:
                    node.sessions.close(session)
        stats.elapsed_s = time.perf_counter() - start
        return GenerationResult(committed[len(prompt_ids) :], finish_reason, seed, stats)
