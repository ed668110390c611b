"""The in-process engine: draft -> verify -> commit rounds on one drafter and one verifier, for one prompt
or many at once (vLLM's `LLM.generate` for users who need no server).

Many prompts run as sessions batched together: each step drafts for every session that has room (one
forward pass per draft step, sessions stopping at their own k, except that load-aware sessions draft one k
sized for the batch: `lock_step_budgets`) and then verifies every session's block in one pass; a session
that finishes leaves and the next prompt takes its place (continuous batching, at most `max_batch`
sessions at once, and only as many as the KV pools can hold). Each session's round is
`eesd.session.Session`'s, the same as the distributed controller's, so batching changes no output.
"""

import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence

from eesd.batch import Finished, PassStats, run_jobs
from eesd.drafter import Drafter, round_policy
from eesd.errors import ResourceExhausted
from eesd.generation import GenerationResult
from eesd.load import Ewma, PassTimer, draft_cost_ratio
from eesd.params import GenerationParams, check_context, validate_prompt
from eesd.policies import VerdictPool, best_block
from eesd.rounds import DraftBlock, DraftRequest
from eesd.session import NO_DRAFT, Session, drafter_cache_after
from eesd.verifier import Verifier

OnTokens = Callable[[int, list[int]], None]  # (prompt index, tokens committed this round)


def _results(finished: list[Finished]) -> list:
    for done in finished:
        if done.error is not None:
            raise done.error
    return [done.result for done in finished]


def lock_step_budgets(
    requests: Sequence[DraftRequest], measured_cost: float | None, pooled: tuple[float, float] = (0.0, 0.0)
) -> list[int | None]:
    """One k for every session of the round whose policy sizes its block by the measured load, None (its
    policy's own bound) for the others. The engine drafts in lock step, so a round's draft steps last as
    long as its longest block: per-session k drawn apart would make all wait for the largest draw.
    `pooled`: the batch's recent verdicts as pseudo-counts (VerdictPool.prior) added to every draw."""
    if measured_cost is None:
        return [None] * len(requests)
    drawn = (round_policy(r, measured_cost, pooled) for r in requests)
    thetas = [policy.load_sized_theta(rng) for policy, rng in drawn]
    sized = [theta for theta in thetas if theta is not None]
    if not sized:
        return [None] * len(requests)
    k_max = max(r.policy.k_max for r, theta in zip(requests, thetas, strict=True) if theta is not None)
    k = best_block(sized, measured_cost, k_max, smallest=0)
    return [None if theta is None else k for theta in thetas]


class SpeculativeEngine:
    def __init__(
        self,
        drafter: Drafter | None,
        verifier: Verifier,
        eos_token_ids: frozenset[int] = frozenset(),
        max_batch: int = 64,
    ):
        if drafter is not None:
            drafter.identity.check_pairs_with(verifier.identity)
        self.drafter, self.verifier = drafter, verifier
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch = max_batch
        self.forget()
        self._pass_s = 0.0  # pass seconds of the round in progress

    def forget(self) -> None:
        """Starts measuring afresh (a benchmark's arms each start from nothing): each node's recent passes
        and what a round costs per session outside them (the draft cost ratio that load-aware policies size
        their blocks by), and the pooled verdicts of recent rounds."""
        self.timers = {"drafter": PassTimer(), "verifier": PassTimer()}
        self.round_overhead = Ewma()
        self.verdicts = VerdictPool()

    def measured_cost(self) -> float | None:
        """The marginal cost ratio of a draft token now (eesd.load), None until both nodes measured it."""
        verifier, drafter = self.timers["verifier"].load(), self.timers["drafter"].load()
        if verifier is None or drafter is None:
            return None
        return draft_cost_ratio(verifier, drafter, self.round_overhead.value or 0.0)

    def generate(
        self, prompt_ids: list[int], params: GenerationParams, on_tokens: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        """One prompt."""
        stream = None if on_tokens is None else lambda _, tokens: on_tokens(tokens)
        return self.generate_batch([prompt_ids], params, stream)[0]

    def generate_batch(
        self,
        prompts: Sequence[list[int]],
        params: GenerationParams | Sequence[GenerationParams],
        on_tokens: OnTokens | None = None,
    ) -> list[GenerationResult]:
        """Every prompt (with its own params, or all with the same), batched; results in prompt order."""
        per_prompt = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} params")
        for prompt, p in zip(prompts, per_prompt, strict=True):
            p.validate()
            validate_prompt(prompt, self.verifier.config.vocab_size)
            check_context(len(prompt), p.max_new_tokens, self.verifier.config.max_position_embeddings)
        waiting = deque(enumerate(zip(prompts, per_prompt, strict=True)))
        active: dict[int, Session] = {}
        results: dict[int, GenerationResult] = {}
        started: dict[int, float] = {}
        try:
            while waiting or active:
                while waiting and len(active) < self.max_batch and self._admit(waiting[0], active, started):
                    waiting.popleft()
                for index, tokens in self._round(active):
                    if on_tokens is not None:
                        on_tokens(index, tokens)
                for index in [i for i, s in active.items() if s.finish_reason is not None]:
                    session = active.pop(index)
                    self._close(session)
                    session.stats.elapsed_s = time.perf_counter() - started[index]
                    results[index] = GenerationResult(
                        session.generated, session.finish_reason, session.seed, session.stats
                    )
        finally:
            for session in active.values():
                self._close(session)
        return [results[i] for i in range(len(prompts))]

    def _admit(self, item, active: dict[int, Session], started: dict[int, float]) -> bool:
        """Opens the next prompt's session when the pools can hold its whole length (so it never runs out
        mid-way); False while they cannot and other sessions will free space."""
        index, (prompt, params) = item
        seed = params.sampling.seed if params.sampling.seed is not None else secrets.randbits(63)
        session = Session.start(uuid.uuid4().hex, prompt, params, seed, self.eos_token_ids)
        length = len(prompt) + params.max_new_tokens
        try:
            for node in self._nodes(session):
                node.sessions.open(session.key, length)
        except ResourceExhausted:
            self._close(session)
            if not active:
                raise
            return False
        active[index], started[index] = session, time.perf_counter()
        return True

    def _round(self, active: dict[int, Session]) -> list[tuple[int, list[int]]]:
        """One round of every active session: drafts in shared passes, then one verify pass."""
        t0, self._pass_s = time.perf_counter(), 0.0
        drafting = [i for i, s in active.items() if self.drafter is not None and s.draft_room > 0]
        cost = self.measured_cost()
        requests = [active[i].draft_request(active[i].drafter_length) for i in drafting]
        budgets = lock_step_budgets(requests, cost, self.verdicts.prior())
        jobs = [
            self.drafter.propose_job(r, measured_cost=cost, budget=b) for r, b in zip(requests, budgets, strict=True)
        ]
        drafted = _results(run_jobs(self.drafter.stack, jobs, self._record("drafter"))) if jobs else []
        blocks: dict[int, DraftBlock] = dict(zip(drafting, drafted, strict=True))
        t1 = time.perf_counter()
        requests = [s.verify_request(s.verifier_length, blocks.get(i, NO_DRAFT)) for i, s in active.items()]
        jobs = [self.verifier.verify_job(r) for r in requests]
        verdicts = _results(run_jobs(self.verifier.stack, jobs, self._record("verifier")))
        t2 = time.perf_counter()
        committed = []
        for (index, session), verdict in zip(active.items(), verdicts, strict=True):
            block = blocks.get(index, NO_DRAFT)
            drafted = index in blocks
            drafter_length = drafter_cache_after(block, len(session.committed), verdict.accepted) if drafted else None
            result = session.settle(block, verdict, drafter_length, t1 - t0, t2 - t1)
            self.verdicts.add(len(block.tokens), verdict.accepted)
            session.apply(result)
            committed.append((index, result.tokens))
        self.round_overhead.add((time.perf_counter() - t0 - self._pass_s) / len(active))
        return committed

    def _record(self, role: str) -> Callable[[PassStats], None]:
        timer = self.timers[role]

        def record(stats: PassStats) -> None:
            timer.record(stats.tokens, stats.rows, stats.seconds)
            self._pass_s += stats.seconds

        return record

    def _nodes(self, session: Session) -> list[Drafter | Verifier]:
        return [self.verifier] if self.drafter is None or not session.speculates else [self.drafter, self.verifier]

    def _close(self, session: Session) -> None:
        for node in (self.drafter, self.verifier):
            if node is not None:
                node.sessions.close(session.key)
