"""Prometheus metrics of every service: raw counters and histograms; rates and ratios are derived in
queries (docs/observability.md defines acceptance rate and mean accepted tokens with their PromQL).

Names follow vLLM where it has the same quantity, with an `eesd:` prefix in place of `vllm:`
(eesd:spec_decode_num_drafts_total ~ vllm:spec_decode_num_drafts_total, ...). Each service is its own
process, so the metrics live in the default registry; a group is created on first use, so a process
exposes only the groups it records (controller, node role, RPCs). Servicers record with one call each.
"""

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from eesd.generation import GenerationStats
from eesd.rounds import RoundStats

log = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E")

PREFIX = "eesd:"
# Seconds: loopback rounds of tiny models take ~1 ms, a large model's verify pass on CPU ~1 s.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
K_BUCKETS = (*range(33), 40, 48, 56, 64)  # one bucket per k <= 32: rounds with k = j are bucket(j) - bucket(j-1)
ROUND_PARTS = ("draft", "verify", "transport", "controller")


class ControllerMetrics:
    """Per round and per request, recorded from the round loop's RoundEvent / Finished events."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        self.rounds = counter("rounds", "Rounds run (draft -> verify cycles, verifier-only rounds included).")
        self.drafts = counter("spec_decode_num_drafts", "Rounds with at least one draft token (vLLM: num_drafts).")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted by the verifier.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by draft position.", ("position",)
        )
        self.drafted_per_pos = counter(
            "spec_decode_num_draft_tokens_per_pos", "Draft tokens proposed by draft position.", ("position",)
        )
        self.generation_tokens = counter("generation_tokens", "Tokens committed (accepted + recovered/bonus).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.request_success = counter("request_success", "Requests finished, by reason.", ("finished_reason",))
        self.k_chosen = Histogram(
            PREFIX + "spec_decode_k_chosen",
            "Draft length k the policy chose per round.",
            buckets=K_BUCKETS,
            registry=registry,
        )
        self.round_seconds = Histogram(
            PREFIX + "round_duration_seconds",
            "Round time by part: draft (drafter), verify (verifier), transport (wire), controller (own work).",
            ("part",),
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Generate time, request to summary.",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.running = Gauge(PREFIX + "num_requests_running", "Generate calls in progress.", registry=registry)
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Generate calls waiting for KV room on a verifier before their first round (admission).",
            registry=registry,
        )
        self.store_seconds = Histogram(
            PREFIX + "state_store_request_duration_seconds",
            "State store (Redis) call latency by operation.",
            ("op",),
            buckets=TIME_BUCKETS,
            registry=registry,
        )

    def record(self, event: Any) -> None:
        """A RoundEvent (its stats are RoundStats) or a Finished event (GenerationStats)."""
        if isinstance(event.stats, RoundStats):
            s = event.stats
            self.rounds.inc()
            self.k_chosen.observe(s.k_chosen)
            self.generation_tokens.inc(s.committed)
            if s.drafted:
                self.drafts.inc()
                self.draft_tokens.inc(s.drafted)
                self.accepted_tokens.inc(s.accepted)
            for position in range(s.drafted):
                self.drafted_per_pos.labels(str(position)).inc()
                if position < s.accepted:
                    self.accepted_per_pos.labels(str(position)).inc()
            for part, seconds in zip(
                ROUND_PARTS, (s.draft_s, s.verify_s, event.transport_ms / 1e3, event.controller_ms / 1e3), strict=True
            ):
                self.round_seconds.labels(part).observe(seconds)
        elif isinstance(event.stats, GenerationStats):
            self.prompt_tokens.inc(event.prompt_tokens)
            self.request_success.labels(event.finish_reason).inc()
            self.request_seconds.observe(event.stats.elapsed_s)

    async def track(self, events: AsyncIterator[E]) -> AsyncIterator[E]:
        """Passes a generation's events through, recording each; counts the generation as running."""
        self.running.inc()
        try:
            async for event in events:
                self.record(event)
                yield event
        finally:
            self.running.dec()


class TimedStateStore:
    """Wraps a StateStore: every coroutine method's latency goes to eesd:state_store_request_duration_seconds."""

    def __init__(self, store: Any, histogram: Histogram | None = None):
        self._store = store
        self._histogram = histogram or controller_metrics().store_seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        child = self._histogram.labels(name)

        @functools.wraps(attr)
        async def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                child.observe(time.perf_counter() - start)

        return timed


class _NodeFamilies:
    def __init__(self, registry: CollectorRegistry):
        role = ("role",)
        self.forward = Histogram(
            PREFIX + "node_forward_seconds",
            "Model work on the node's compute thread by op (propose, verify, prefill, lookahead, propose_ahead, "
            "load, open, close): from joining a pass, or starting a call, to its result.",
            (*role, "op"),
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            PREFIX + "node_queue_wait_seconds",
            "Time model work waited to join a pass (or, for a call, for the compute thread).",
            role,
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            PREFIX + "node_queue_depth",
            "Model work submitted and not finished: waiting or in the running batch.",
            role,
            registry=registry,
        )
        self.waiting = Gauge(
            PREFIX + "node_requests_waiting",
            "Model work waiting to join a pass (the batch or its token cap is full).",
            role,
            registry=registry,
        )
        self.pass_seconds = Histogram(
            PREFIX + "node_pass_seconds",
            "Forward passes of the node's batch.",
            role,
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            PREFIX + "node_batch_size",
            "Sessions (rows) in a forward pass.",
            role,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.pass_tokens = Histogram(
            PREFIX + "node_pass_tokens",
            "New tokens fed in a forward pass, summed over its sessions.",
            role,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=registry,
        )
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_perc",
            "Fraction of the node's KV pool reserved by sessions (vLLM's kv_cache_usage_perc, 0..1).",
            role,
            registry=registry,
        )
        self.sessions = Gauge(
            PREFIX + "node_sessions", "Sessions with a KV cache on the node.", role, registry=registry
        )
        self.rollbacks = Counter(
            PREFIX + "kv_rollbacks",
            "Model calls whose KV cache crops dropped tokens (rejected drafts).",
            role,
            registry=registry,
        )
        self.rollback_tokens = Counter(
            PREFIX + "kv_rollback_tokens", "KV positions dropped by rollbacks.", role, registry=registry
        )
        self.prefills = Counter(
            PREFIX + "prefills", "Prefill RPCs (session start and cache repair).", role, registry=registry
        )
        self.prefill_tokens = Counter(PREFIX + "prefill_tokens", "Tokens fed by Prefill RPCs.", role, registry=registry)
        self.lookaheads = Counter(
            PREFIX + "drafter_lookaheads",
            "Rounds the drafter drafted ahead while the previous one was verified, by outcome: used, "
            "dropped (the guessed verdict or request did not come), skipped (the node had other work).",
            ("outcome",),
            registry=registry,
        )
        self.cache_mismatches = Counter(
            PREFIX + "cache_mismatches",
            "Requests answered with a cache mismatch (the controller re-prefills).",
            role,
            registry=registry,
        )


class NodeMetrics:
    """A drafter's or verifier's metrics, labelled by role."""

    def __init__(self, role: str, families: _NodeFamilies):
        self.role = role
        self._f = families
        self._queue_wait = families.queue_wait.labels(role)
        self._pass_seconds = families.pass_seconds.labels(role)
        self._batch_size = families.batch_size.labels(role)
        self._pass_tokens = families.pass_tokens.labels(role)

    def watch_sessions(self, count: Callable[[], int]) -> None:
        self._f.sessions.labels(self.role).set_function(count)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self._f.queue_depth.labels(self.role).set_function(depth)

    def watch_waiting(self, count: Callable[[], int]) -> None:
        self._f.waiting.labels(self.role).set_function(count)

    def watch_kv_usage(self, usage: Callable[[], float]) -> None:
        self._f.kv_usage.labels(self.role).set_function(usage)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def work_done(self, op: str, seconds: float, error: BaseException | None = None) -> None:
        self._f.forward.labels(self.role, op).observe(seconds)
        if getattr(error, "cache_length", None) is not None:  # eesd.kv_cache.CacheBehind (torch-free here)
            self._f.cache_mismatches.labels(self.role).inc()

    def forward_pass(self, rows: int, tokens: int, seconds: float) -> None:
        self._pass_seconds.observe(seconds)
        self._batch_size.observe(rows)
        self._pass_tokens.observe(tokens)

    def rollback(self, dropped_tokens: int) -> None:
        if dropped_tokens > 0:
            self._f.rollbacks.labels(self.role).inc()
            self._f.rollback_tokens.labels(self.role).inc(dropped_tokens)

    def prefill(self, tokens: int) -> None:
        self._f.prefills.labels(self.role).inc()
        self._f.prefill_tokens.labels(self.role).inc(tokens)

    def cache_mismatch(self) -> None:
        self._f.cache_mismatches.labels(self.role).inc()

    def lookahead(self, outcome: str) -> None:
        self._f.lookaheads.labels(outcome).inc()


class RpcMetrics:
    """Every status a server returns, by method (go-grpc-prometheus names, eesd: prefix)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        labels = ("grpc_service", "grpc_method")
        self.handled = Counter(
            PREFIX + "grpc_server_handled",
            "RPCs completed, by status code (OK included).",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            PREFIX + "grpc_server_handling_seconds",
            "RPC time until its status.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )

    @contextmanager
    def call(self, method: str):
        """Times the call; the body sets `status[0]` to the grpc.StatusCode it ends with."""
        service, _, name = method.lstrip("/").rpartition("/")
        status, start = ["UNKNOWN"], time.perf_counter()
        try:
            yield status
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            status[0] = "CANCELLED"
            raise
        finally:
            code = getattr(status[0], "name", status[0])
            self.handled.labels(service, name, code).inc()
            self.seconds.labels(service, name).observe(time.perf_counter() - start)


@functools.cache
def controller_metrics() -> ControllerMetrics:
    return ControllerMetrics()


@functools.cache
def _node_families() -> _NodeFamilies:
    return _NodeFamilies(REGISTRY)


@functools.cache
def node_metrics(role: str) -> NodeMetrics:
    return NodeMetrics(role, _node_families())


@functools.cache
def rpc_metrics() -> RpcMetrics:
    return RpcMetrics()


def start_exporter(port: int, host: str = "0.0.0.0") -> bool:
    """Serves /metrics over HTTP on `port` (0: off). A port in use is logged, not fatal: metrics are optional."""
    if port <= 0:
        return False
    prometheus_client.disable_created_metrics()
    try:
        prometheus_client.start_http_server(port, addr=host)
    except OSError as error:
        log.error("metrics exporter could not listen on %s:%d: %s", host, port, error)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True
