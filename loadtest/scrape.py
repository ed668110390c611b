"""Scraping the services' Prometheus /metrics and turning before/after deltas into speculation stats.

The definitions match docs/observability.md (and the PromQL there): acceptance rate = accepted / drafted
tokens; mean accepted tokens (tau) = committed tokens / rounds; vLLM's mean acceptance length =
1 + accepted / drafts.
"""

import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

P = "eesd:"
V = "vllm:"  # the metrics vLLM also has carry its names (serving/metrics.py)


@dataclass(frozen=True)
class Samples:
    """Every sample of one or more scrapes: (sample name, sorted label pairs) -> value (summed over scrapes)."""

    values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> "Samples":
        values: dict = {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    values[key] = values.get(key, 0.0) + s.value
        return cls(values)

    def __sub__(self, before: "Samples") -> "Samples":
        """The change between two scrapes (counters and histograms; gauges keep the later value's change)."""
        return Samples({k: v - before.values.get(k, 0.0) for k, v in self.values.items()})

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= set(ls))

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        want, out = set(labels.items()), {}
        for (n, ls), v in self.values.items():
            d = dict(ls)
            if n == name and label in d and want <= set(ls):
                out[d[label]] = out.get(d[label], 0.0) + v
        return out


def fetch(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> Samples:
    return Samples.parse(fetch(u, timeout_s) for u in urls)


def k_histogram(delta: Samples) -> dict[int, int]:
    """Rounds per chosen k, from the cumulative buckets of eesd:spec_decode_k_chosen (one bucket per k)."""
    buckets = sorted(
        (float(le), v) for le, v in delta.by_label(P + "spec_decode_k_chosen_bucket", "le").items() if le != "+Inf"
    )
    out, previous = {}, 0.0
    for le, cumulative in buckets:
        if cumulative - previous > 0:
            out[int(le)] = int(round(cumulative - previous))
        previous = cumulative
    return out


def _counted(counts: dict[str, float]) -> dict[str, float]:
    """The labels counted during the run (a series an earlier run made shows a change of 0)."""
    return {label: n for label, n in counts.items() if n}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def mean_ms(delta: Samples, histogram: str, *labels: str) -> dict[str, float]:
    """Mean of a histogram in ms per label combination ("drafter/propose"), from its _sum and _count."""
    out = {}
    for (name, ls), count in delta.values.items():
        if name == histogram + "_count" and count > 0:
            d = dict(ls)
            total = delta.values.get((histogram + "_sum", ls), 0.0)
            out["/".join(d.get(label, "") for label in labels)] = total / count * 1e3
    return dict(sorted(out.items()))


def speculation_stats(delta: Samples) -> dict:
    """Speculation and node statistics of a run: the change of the services' metrics over it."""
    rounds = delta.total(P + "rounds_total")
    drafts = delta.total(V + "spec_decode_num_drafts_total")
    drafted = delta.total(V + "spec_decode_num_draft_tokens_total")
    accepted = delta.total(V + "spec_decode_num_accepted_tokens_total")
    committed = delta.total(V + "generation_tokens_total")
    drafted_at = delta.by_label(P + "spec_decode_num_draft_tokens_per_pos_total", "position")
    accepted_at = delta.by_label(V + "spec_decode_num_accepted_tokens_per_pos_total", "position")
    time_s = delta.by_label(P + "round_duration_seconds_sum", "part")
    total_s = sum(time_s.values())
    return {
        "rounds": int(rounds),
        "drafts": int(drafts),
        "draft_tokens": int(drafted),
        "accepted_tokens": int(accepted),
        "committed_tokens": int(committed),
        "acceptance_rate": _ratio(accepted, drafted),
        "mean_accepted_tokens": _ratio(committed, rounds),
        "vllm_mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "acceptance_by_position": [
            accepted_at.get(str(i), 0.0) / drafted_at[str(i)]
            for i in sorted(map(int, drafted_at))
            if drafted_at[str(i)] > 0
        ],
        "k_histogram": {str(k): v for k, v in k_histogram(delta).items()},
        "round_time_ms": {part: seconds * 1e3 for part, seconds in sorted(time_s.items())},
        "round_time_share": {part: _ratio(seconds, total_s) for part, seconds in sorted(time_s.items())},
        "rollbacks": delta.by_label(P + "kv_rollbacks_total", "role"),
        "rollback_tokens": delta.by_label(P + "kv_rollback_tokens_total", "role"),
        "prefills": delta.by_label(P + "prefills_total", "role"),
        "cache_mismatches": delta.by_label(P + "cache_mismatches_total", "role"),
        "grpc_codes": _counted(delta.by_label(P + "grpc_server_handled_total", "grpc_code")),
        "http_statuses": _counted(delta.by_label(P + "http_requests_total", "status", handler="/v1/completions")),
        "node_forward_ms_mean": mean_ms(delta, P + "node_forward_seconds", "role", "op"),
        "node_queue_wait_ms_mean": mean_ms(delta, P + "node_queue_wait_seconds", "role"),
        "state_store_ms_mean": mean_ms(delta, P + "state_store_request_duration_seconds", "op"),
    }
