"""Names, label values, buckets and the small machinery every metric family shares: the
cached histogram children (no-ops with metrics off), the scrape-time collector, and the
``Samples`` of a registry. The package ``services.core.metrics`` is where every metric name is
spelled (docs/observability.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Recommend stages timed separately (the total, by status code, is its own histogram).
STAGES = ("queue", "features", "lookup", "score")
SHED_REASONS = ("caller_rate", "concurrency", "deadline", "queue_full")
# Where dead requests were dropped: "batching" = the caller was gone before a batch formed.
DROP_STAGES = ("batching", "queued", "after_features", "after_lookup")
LOOKUP_KINDS = ("primary", "hedge", "stall_retry")
# Lookup error codes every node reports from the start (0 until seen), so a rule or a panel over
# them has series before the first failure; any other code appears when it happens.
LOOKUP_ERROR_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "INTERNAL")
# The feature store: ok, lost (Redis answered without its marker), unreachable (breaker open or
# probing), none (no store configured). docs/failure-modes.md has the rules.
FEATURE_STORE_STATES = ("ok", "lost", "unreachable", "none")
FEATURE_STORE_FAILURES = ("timeout", "error", "fast_failure")
DEGRADED_REASONS = ("candidates_capped", "feature_defaults")

RECOMMEND_LATENCY = "shardrec_recommend_latency_seconds"
STAGE_LATENCY = "shardrec_recommend_stage_seconds"
BATCH_SIZE = "shardrec_batch_size"
LOOKUP_LATENCY = "shardrec_lookup_latency_seconds"
SHARD_LOOKUP_LATENCY = "shardrec_shard_lookup_seconds"
SHARD_POOLING = "shardrec_shard_pooling_seconds"
SHARD_VERSION_LOAD = "shardrec_shard_version_load_seconds"
# Names that other modules read (``cluster top``); every other name is written below only.
SHED = "shardrec_shed"
LOOKUP_RPCS = "shardrec_lookup_rpcs"
IN_FLIGHT = "shardrec_in_flight_requests"
QUEUE_DEPTH = "shardrec_queue_depth"
ADMISSION_LIMIT = "shardrec_admission_limit"
MODEL_VERSION = "shardrec_model_version"
SHARD_MAP_VERSION = "shardrec_shard_map_version"
FEATURE_STORE_STATE = "shardrec_feature_store_state"
LOOKUP_OUTSTANDING = "shardrec_lookup_outstanding"
NODE_EJECTED = "shardrec_lookup_node_ejected"
SHARD_SERVING_VERSION = "shardrec_shard_serving_version"
SHARD_VERSION_READY = "shardrec_shard_version_ready"
SHARD_PARTITION_BYTES = "shardrec_shard_partition_bytes"


class _NoOp:
    """A histogram child that records nothing (metrics off)."""

    def observe(self, _value: float) -> None:
        pass


_NOOP = _NoOp()


class _Histograms:
    """One histogram family with its children cached by label values."""

    def __init__(self, registry: CollectorRegistry | None, name: str, doc: str, labels: tuple[str, ...], buckets) -> None:
        self._family = None if registry is None else Histogram(name, doc, labels, buckets=buckets, registry=registry)
        self._children: dict[tuple[str, ...], object] = {}

    def child(self, *values: str):
        c = self._children.get(values)
        if c is None:
            if self._family is None:
                c = _NOOP
            else:
                c = self._family.labels(*values) if values else self._family
            self._children[values] = c
        return c


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _Collector:
    """A prometheus_client custom collector over a function returning metric families."""

    def __init__(self, families: Callable[[], list]) -> None:
        self._families = families

    def collect(self):
        return iter(self._families())

    def describe(self):
        return []  # families vary with the nodes and partitions seen: no fixed description


class Samples:
    """The samples of a registry, summed by name and label filter."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows: list[tuple[str, Mapping[str, str], float]] = [
            (s.name, s.labels, s.value) for fam in registry.collect() for s in fam.samples
        ]

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.rows if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, lab, v in self.rows:
            if n == name and label in lab and all(lab.get(k) == want for k, want in labels.items()):
                out[lab[label]] = out.get(lab[label], 0.0) + v
        return out

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.rows)
