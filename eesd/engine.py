"""The in-process engine: draft -> verify -> commit rounds on one drafter and one verifier.

The distributed controller runs the same round over gRPC; both keep only the committed tokens and the
policy state as hard state, and tell each node which committed prefix its cache must cover.
"""

import secrets
import time
import uuid
from collections.abc import Callable

from eesd.drafter import Drafter
from eesd.generation import GenerationResult
from eesd.params import GenerationParams, validate_prompt
from eesd.session import NO_DRAFT, Session, drafter_cache_after
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
        session = Session.start(uuid.uuid4().hex, prompt_ids, params, seed, self.eos_token_ids)
        start = time.perf_counter()
        try:
            while session.finish_reason is None:
                t0 = time.perf_counter()
                block = NO_DRAFT
                if self.drafter is not None and session.draft_room > 0:
                    block = self.drafter.propose(session.draft_request(session.drafter_length))
                t1 = time.perf_counter()
                verdict = self.verifier.verify(session.verify_request(session.verifier_length, block))
                t2 = time.perf_counter()
                drafter_length = drafter_cache_after(block, len(session.committed), verdict.accepted)
                result = session.settle(block, verdict, drafter_length, t1 - t0, t2 - t1)
                session.apply(result)
                if on_tokens is not None:
                    on_tokens(result.tokens)
        finally:
            for node in (self.drafter, self.verifier):
                if node is not None:
                    node.sessions.close(session.session_id)
        session.stats.elapsed_s = time.perf_counter() - start
        return GenerationResult(session.generated, session.finish_reason, seed, session.stats)
