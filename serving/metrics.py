"""Prometheus metrics of every service: raw counters, gauges and histograms; rates and ratios are derived in
queries (docs/observability.md defines them with their PromQL).

Where vLLM has the quantity, the metric has vLLM's own name (`vllm:time_to_first_token_seconds`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:spec_decode_num_accepted_tokens`, ...), its
semantics and its `model_name` label, so that dashboards, alerts and gateways written for vLLM read EESD as
they are (the mapping: docs/observability.md). What only EESD has is named `eesd:...`. Each service is its own
process, so the metrics live in the default registry; a group is created on first use, so a process exposes
only the groups it records (controller, node role, RPCs). Servicers record with one call each.
"""

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from eesd.generation import GenerationStats
from eesd.rounds import RoundStats
from serving import tracing
from serving.calls import Call, HttpCall

log = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E")
# Errors of a state store call that mean the store failed, not that it answered "no".
STORE_FAILURE_STATUSES = ("UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")

PREFIX = "eesd:"
VLLM = "vllm:"
MODEL_LABEL = "model_name"
# Seconds: loopback rounds of tiny models take ~1 ms, a large model's verify pass on CPU ~1 s.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
K_BUCKETS = (*range(33), 40, 48, 56, 64)  # one bucket per k <= 32: rounds with k = j are bucket(j) - bucket(j-1)
ROUND_PARTS = ("draft", "verify", "transport", "controller")
# vLLM's buckets (vllm/v1/metrics/loggers.py), with finer ones below them: a round of a small model takes
# milliseconds, less than vLLM's first bucket.
TTFT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
TOKEN_LATENCY_BUCKETS += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0)
REQUEST_LATENCY_BUCKETS += (40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's 1-2-5 token-count buckets, up to the longest context the controller may see.
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(5) for m in (1, 2, 5) if m * 10**e <= 65536)
# vLLM's finished_reason values: stop (EOS), length, abort (cancelled).
VLLM_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}

_model_name = ""


def set_model_name(name: str) -> None:
    """The `model_name` label of this process's vllm: metrics (config served_model_name); set at startup,
    before the first metric is recorded."""
    global _model_name
    _model_name = name


def model_name() -> str:
    return _model_name


@dataclass
class RequestTimes:
    """One Generate call as the controller sees it: what its latency metrics and its access line are made of
    (perf_counter seconds)."""

    start: float = field(default_factory=time.perf_counter)
    session_id: str = ""
    first_token: float | None = None  # the first round's tokens were ready (a resume's catch-up excluded)
    last_token: float | None = None
    tokens: int = 0  # tokens of the call's rounds (a resume's catch-up excluded)
    rounds: int = 0
    resumed: bool = False  # the call resumed a session: its first chunk caught the client up
    caught_up: int = 0  # tokens of that catch-up chunk
    finished: Any = None  # the Finished event, once the call got one

    def ttft_s(self) -> float | None:
        return None if self.first_token is None or self.resumed else self.first_token - self.start

    def tpot_s(self) -> float | None:
        """Time per output token after the first, the mean over the call (vLLM's request TPOT)."""
        if self.first_token is None or self.last_token is None or self.tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.tokens - 1)

    def access_fields(self) -> dict[str, Any]:
        """The call's part of its access line (serving.logs): ids, counts and durations, never the prompt."""
        fields: dict[str, Any] = {"session": self.session_id[:64]} if self.session_id else {}
        fields.update(rounds=self.rounds, streamed_tokens=self.tokens)
        if self.resumed:
            fields.update(resumed=True, caught_up_tokens=self.caught_up)
        for name, seconds in (("ttft_ms", self.ttft_s()), ("tpot_ms", self.tpot_s())):
            if seconds is not None:
                fields[name] = round(seconds * 1e3, 3)
        if self.finished is not None:
            event, stats = self.finished, self.finished.stats
            fields.update(
                finish_reason=event.finish_reason,
                prompt_tokens=event.prompt_tokens,
                generated_tokens=stats.generated,
                drafted=stats.drafted,
                accepted=stats.accepted,
                tau=round(stats.mean_accepted_tokens, 3),
                draft_ms=round(stats.draft_s * 1e3, 3),
                verify_ms=round(stats.verify_s * 1e3, 3),
                transport_ms=round(event.transport_ms, 3),
                controller_ms=round(event.controller_ms, 3),
            )
        return fields


class ControllerMetrics:
    """Per round and per request, recorded from the round loop's RoundEvent / Finished events."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, model: str | None = None):
        model = _model_name if model is None else model
        self.model = model

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def vllm(kind, name: str, doc: str, labels: tuple[str, ...] = (), **options):
            family = kind(VLLM + name, doc, (MODEL_LABEL, *labels), registry=registry, **options)
            return family if labels else family.labels(model)

        # vLLM's names and meaning, with its model_name label.
        self.running = vllm(Gauge, "num_requests_running", "Generate calls admitted and generating.")
        self.waiting = vllm(
            Gauge,
            "num_requests_waiting",
            "Generate calls waiting for KV room on a verifier before their first round (admission).",
        )
        self.queue_seconds = vllm(
            Histogram,
            "request_queue_time_seconds",
            "Time a Generate call waited for KV room on a verifier (admission).",
            buckets=REQUEST_LATENCY_BUCKETS,
        )
        self.ttft = vllm(
            Histogram,
            "time_to_first_token_seconds",
            "Generate received -> its first tokens ready to stream (queueing and the first round included).",
            buckets=TTFT_BUCKETS,
        )
        self.itl = vllm(
            Histogram,
            "inter_token_latency_seconds",
            "Time between consecutive streamed chunks of a request (one chunk per round).",
            buckets=TOKEN_LATENCY_BUCKETS,
        )
        self.tpot = vllm(
            Histogram,
            "request_time_per_output_token_seconds",
            "Per request: (last tokens - first tokens) / (output tokens - 1).",
            buckets=TOKEN_LATENCY_BUCKETS,
        )
        self.request_seconds = vllm(
            Histogram,
            "e2e_request_latency_seconds",
            "Generate time, request received to summary.",
            buckets=REQUEST_LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = vllm(
            Histogram, "request_prompt_tokens", "Prompt tokens per finished request.", buckets=TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = vllm(
            Histogram,
            "request_generation_tokens",
            "Generated tokens per finished request.",
            buckets=TOKEN_COUNT_BUCKETS,
        )
        self.prompt_tokens = vllm(Counter, "prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = vllm(Counter, "generation_tokens", "Tokens committed (accepted + recovered/bonus).")
        self.request_success = vllm(
            Counter,
            "request_success",
            "Requests finished, by reason (stop: EOS, length, abort: cancelled).",
            ("finished_reason",),
        )
        self.drafts = vllm(Counter, "spec_decode_num_drafts", "Rounds with at least one draft token.")
        self.draft_tokens = vllm(Counter, "spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted_tokens = vllm(
            Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted by the verifier."
        )
        self.accepted_per_pos = vllm(
            Counter,
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by draft position.",
            ("position",),
        )
        # EESD's own.
        self.rounds = counter("rounds", "Rounds run (draft -> verify cycles, verifier-only rounds included).")
        self.drafted_per_pos = counter(
            "spec_decode_num_draft_tokens_per_pos", "Draft tokens proposed by draft position.", ("position",)
        )
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
        self.store_seconds = Histogram(
            PREFIX + "state_store_request_duration_seconds",
            "State store (Redis) call latency by operation.",
            ("op",),
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.store_errors = counter(
            "state_store_errors", "State store (Redis) calls that failed, by operation.", ("op",)
        )
        self.nodes_ready = Gauge(
            PREFIX + "nodes_ready",
            "Drafters or verifiers (role) this controller may route sessions to now: discovered ready, not kept "
            "out after a failure, answering health probes.",
            ("role",),
            registry=registry,
        )

    def watch_running(self, count: Callable[[], int]) -> None:
        self.running.set_function(count)

    def watch_nodes_ready(self, role: str, count: Callable[[], int]) -> None:
        self.nodes_ready.labels(role).set_function(count)

    @contextmanager
    def queued(self):
        """Around a new session's admission: counted as waiting, its wait observed as queue time."""
        start = time.perf_counter()
        with self.waiting.track_inprogress():
            try:
                yield
            finally:
                self.queue_seconds.observe(time.perf_counter() - start)

    def record(self, event: Any, times: RequestTimes | None = None) -> None:
        """A RoundEvent (its stats are RoundStats) or a Finished event (GenerationStats)."""
        times = times if times is not None else RequestTimes()
        times.session_id = event.session_id
        now = time.perf_counter()
        if isinstance(event.stats, RoundStats):
            if getattr(event, "replay", False):  # a resumed stream's catch-up: tokens of earlier rounds
                times.resumed, times.caught_up = True, len(event.tokens)
                return
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
                    self.accepted_per_pos.labels(self.model, str(position)).inc()
            for part, seconds in zip(
                ROUND_PARTS, (s.draft_s, s.verify_s, event.transport_ms / 1e3, event.controller_ms / 1e3), strict=True
            ):
                self.round_seconds.labels(part).observe(seconds)
            if event.tokens:
                if times.first_token is None:
                    times.first_token = now
                    if not times.resumed:
                        self.ttft.observe(now - times.start)
                else:
                    self.itl.observe(now - times.last_token)
                times.last_token = now
                times.tokens += len(event.tokens)
            times.rounds += 1
        elif isinstance(event.stats, GenerationStats):
            times.finished = event
            self.prompt_tokens.inc(event.prompt_tokens)
            self.request_success.labels(self.model, VLLM_FINISH_REASONS.get(event.finish_reason, "abort")).inc()
            self.request_prompt_tokens.observe(event.prompt_tokens)
            self.request_generation_tokens.observe(event.stats.generated)
            self.request_seconds.observe(now - times.start)
            if (tpot := times.tpot_s()) is not None:
                self.tpot.observe(tpot)

    async def track(self, events: AsyncIterator[E], times: RequestTimes | None = None) -> AsyncIterator[E]:
        """Passes a generation's events through, recording each into the metrics and `times`."""
        times = times if times is not None else RequestTimes()
        async for event in events:
            self.record(event, times)
            yield event


class TimedStateStore:
    """Wraps a StateStore: every coroutine method's latency goes to eesd:state_store_request_duration_seconds,
    its failures to reach the store (UNAVAILABLE, INTERNAL, ...) to eesd:state_store_errors_total, and, with
    tracing on, each call is a span."""

    def __init__(self, store: Any, histogram: Histogram | None = None, errors: Counter | None = None):
        self._store = store
        self._histogram = histogram or controller_metrics().store_seconds
        self._errors = errors if errors is not None or histogram is not None else controller_metrics().store_errors

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        child = self._histogram.labels(name)

        errors = self._errors.labels(name) if self._errors is not None else None

        @functools.wraps(attr)
        async def timed(*args, **kwargs):
            start = time.perf_counter()
            with tracing.span(f"state_store.{name}", {"db.operation": name}):
                try:
                    return await attr(*args, **kwargs)
                except Exception as error:
                    # Outcomes the store answers with (a lost round guard, a missing session) are not errors.
                    if errors is not None and getattr(error, "status", "") in STORE_FAILURE_STATUSES:
                        errors.inc()
                    raise
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
            VLLM + "kv_cache_usage_perc",
            "KV-cache usage: the fraction (0..1) of the node's KV pool reserved by sessions.",
            (MODEL_LABEL, *role),
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

    def __init__(self, role: str, families: _NodeFamilies, model: str | None = None):
        self.role = role
        self.model = _model_name if model is None else model
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
        self._f.kv_usage.labels(self.model, self.role).set_function(usage)

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
    """Every status a server returns, by method: RPCs under go-grpc-prometheus names, requests to the HTTP API
    under prometheus-fastapi-instrumentator's (vLLM's API server exports those), both with the eesd: prefix."""

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
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests completed, by route (handler), method and status code (499: the client went away).",
            ("handler", "method", "status"),
            registry=registry,
        )
        self.http_seconds = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request time until its response ended.",
            ("handler", "method"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )

    @contextmanager
    def served(self, call: Call):
        """Times `call`; counts it with the status `call.status` holds when it ends."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            if isinstance(call, HttpCall):
                self.http_requests.labels(call.route, call.verb, call.status_name).inc()
                self.http_seconds.labels(call.route, call.verb).observe(seconds)
            else:
                self.handled.labels(call.service, call.rpc, call.status_name).inc()
                self.seconds.labels(call.service, call.rpc).observe(seconds)


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
