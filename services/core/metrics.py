"""Every Prometheus metric of shardrec, spelled here and nowhere else (docs/observability.md
lists them with their labels). Each process builds one ``CollectorRegistry`` in its ``main``
and passes it down; nothing here is a module-level singleton.

Two kinds of metric, by cost:

- **Hot path**: histograms observed while serving (``FrontendMetrics``, ``ShardMetrics``):
  one observe per stage per batch, per request for its queue wait and total, per Lookup RPC.
  Label children are created once and cached. With metrics off they are no-ops.
- **At scrape time**: counters and gauges read from the plain integer counters the serving
  objects already keep (``FrontendReading``, ``ShardReading``, filled by the frontend and the
  shard), so a counter costs an integer increment while serving, nothing more.

``FrontendAdmin.GetStats`` reads the same registry (``frontend_stats``): its legacy names are
mapped from the samples here, counters and gauges apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds; dense around a 50 ms latency objective.
LATENCY_BUCKETS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Recommend stages timed separately (the total, by status code, is its own histogram).
STAGES = ("queue", "features", "lookup", "score")
SHED_REASONS = ("caller_rate", "concurrency", "deadline", "queue_full")
# Where dead requests were dropped: "batching" = the caller was gone before a batch formed.
DROP_STAGES = ("batching", "queued", "after_features", "after_lookup")
LOOKUP_KINDS = ("primary", "hedge", "stall_retry")
FEATURE_STORE_STATES = ("ok", "degraded", "lost", "none")

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


# -- the frontend ------------------------------------------------------------------------------


@dataclass
class NodeReading:
    """One shard node as the frontend's lookup step sees it."""

    rpcs: dict[str, int] = field(default_factory=dict)  # LOOKUP_KINDS -> calls sent
    errors: dict[str, int] = field(default_factory=dict)  # status code name -> failed calls
    failovers: int = 0
    reroutes: int = 0
    ejections: int = 0
    outstanding: int = 0
    ejected: bool = False


@dataclass
class FrontendReading:
    """What the frontend's serving objects count, read at scrape time (and by GetStats)."""

    admitted: int = 0
    shed: dict[str, int] = field(default_factory=dict)  # SHED_REASONS
    dropped: dict[str, int] = field(default_factory=dict)  # DROP_STAGES
    wasted: int = 0  # answers computed for callers already gone
    request_ids_replaced: int = 0
    degraded: int = 0
    batches: int = 0
    batched_requests: int = 0
    multi_request_batches: int = 0
    batch_splits: int = 0
    largest_batch: int = 0
    item_ids_requested: int = 0
    item_ids_unique: int = 0
    bags_requested: int = 0
    bags_looked_up: int = 0
    feature_store_round_trips: int = 0
    lookup_batches: int = 0
    lookup_hedge_wins: int = 0
    lookup_hedges_cancelled: int = 0
    lookup_ids: int = 0
    lookup_bytes_sent: int = 0
    lookup_bytes_received: int = 0
    wire_bytes: dict[str, int] = field(default_factory=dict)  # feature side -> bytes
    nodes: dict[str, NodeReading] = field(default_factory=dict)
    queued: int = 0
    in_flight: int = 0
    admission_limit: int = 0
    shed_p99_s: float = 0.0
    live_nodes: int | None = None  # None: no cluster view (a baseline frontend)
    partitions_without_replica: int = 0
    model_version: int = 0
    shard_map_version: int = 0


class FrontendMetrics:
    """The frontend's metrics on ``registry``: hot-path histograms, and a collector that reads
    ``read()`` at scrape time (set ``read`` once the serving objects exist; until then the
    counters read 0). ``enabled`` False: histograms record nothing (the collector still
    serves GetStats). Event loop only, but for ``collect``."""

    def __init__(self, registry: CollectorRegistry, read: Callable[[], FrontendReading] = FrontendReading, *, enabled: bool = True) -> None:
        hist = registry if enabled else None
        self.registry = registry
        self._latency = _Histograms(hist, RECOMMEND_LATENCY, "Recommend latency in this frontend, arrival to answer, by status code", ("code",), LATENCY_BUCKETS_S)
        self._stage = _Histograms(hist, STAGE_LATENCY, "Recommend time per stage: queue per request; features, lookup, score per batch", ("stage",), LATENCY_BUCKETS_S)
        self._batch = _Histograms(hist, BATCH_SIZE, "Requests per micro-batch", (), BATCH_BUCKETS)
        self._lookup = _Histograms(hist, LOOKUP_LATENCY, "Lookup RPC latency per shard node (answered calls)", ("node",), LATENCY_BUCKETS_S)
        self._state = "none"
        self.read = read
        registry.register(_Collector(lambda: _frontend_families(self.read(), self._state)))

    def request_done(self, code: str, seconds: float) -> None:
        self._latency.child(code).observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.child(stage).observe(seconds)

    def batch(self, size: int) -> None:
        self._batch.child().observe(size)

    def lookup(self, node: str, seconds: float) -> None:
        self._lookup.child(node).observe(seconds)

    def feature_store_state(self, state: str) -> None:
        """The feature store's state, one of FEATURE_STORE_STATES (set by feature prep)."""
        if state not in FEATURE_STORE_STATES:
            raise ValueError(f"feature store state must be one of {FEATURE_STORE_STATES}, got {state!r}")
        self._state = state


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _frontend_families(r: FrontendReading, feature_state: str) -> list:
    c, g = _counter, _gauge
    fams = []

    def one(f, value, *labels):
        f.add_metric(list(labels), value)
        return f

    fams.append(one(c("shardrec_admitted", "Recommend calls admitted"), r.admitted))
    shed = c(SHED, "Recommend calls refused for load, by reason", ["reason"])
    for reason in SHED_REASONS:
        shed.add_metric([reason], r.shed.get(reason, 0))
    dropped = c("shardrec_dropped_requests", "Dead requests (deadline passed or caller gone) dropped before a stage", ["stage"])
    for stage in DROP_STAGES:
        dropped.add_metric([stage], r.dropped.get(stage, 0))
    fams += [shed, dropped]
    fams.append(one(c("shardrec_wasted_requests", "Answers computed in full for callers already gone"), r.wasted))
    fams.append(one(c("shardrec_request_ids_replaced", "Unusable request ids replaced by generated ones"), r.request_ids_replaced))
    fams.append(one(c("shardrec_degraded_requests", "Requests answered in degraded mode (candidates capped)"), r.degraded))
    fams.append(one(c("shardrec_batches", "Micro-batches formed"), r.batches))
    fams.append(one(c("shardrec_batched_requests", "Requests that joined a micro-batch"), r.batched_requests))
    fams.append(one(c("shardrec_multi_request_batches", "Micro-batches of more than one request"), r.multi_request_batches))
    fams.append(one(c("shardrec_batch_splits", "Failed batches split to isolate the request at fault"), r.batch_splits))
    ids = c("shardrec_item_ids", "Candidate item ids per batch: requested, and unique after dedup", ["kind"])
    ids.add_metric(["requested"], r.item_ids_requested)
    ids.add_metric(["unique"], r.item_ids_unique)
    bags = c("shardrec_bags", "Bags the batches needed, and the distinct bags looked up", ["kind"])
    bags.add_metric(["requested"], r.bags_requested)
    bags.add_metric(["looked_up"], r.bags_looked_up)
    fams += [ids, bags]
    fams.append(one(c("shardrec_feature_store_round_trips", "Feature store (Redis) round trips"), r.feature_store_round_trips))
    fams.append(one(c("shardrec_lookup_batches", "Micro-batches sent to the lookup step"), r.lookup_batches))
    fams.append(one(c("shardrec_lookup_hedge_wins", "Hedge RPCs whose answer was used"), r.lookup_hedge_wins))
    fams.append(one(c("shardrec_lookup_hedges_cancelled", "Lookup RPCs cancelled: late calls a hedge beat, hedges not needed"), r.lookup_hedges_cancelled))
    fams.append(one(c("shardrec_lookup_ids", "Ids sent to shards"), r.lookup_ids))
    lb = c("shardrec_lookup_bytes", "Lookup payload bytes: sent (request) and received (answers)", ["direction"])
    lb.add_metric(["sent"], r.lookup_bytes_sent)
    lb.add_metric(["received"], r.lookup_bytes_received)
    wire = c("shardrec_wire_bytes", "Embedding bytes on the wire (ids out, pooled vectors back) by feature side", ["side"])
    for side in ("user", "item"):
        wire.add_metric([side], r.wire_bytes.get(side, 0))
    fams += [lb, wire]
    rpcs = c(LOOKUP_RPCS, "Lookup RPCs sent per shard node, by kind", ["node", "kind"])
    errors = c("shardrec_lookup_errors", "Failed Lookup RPCs per shard node, by status code", ["node", "code"])
    failovers = c("shardrec_lookup_failovers", "Node calls re-planned on another replica after an error or timeout", ["node"])
    reroutes = c("shardrec_lookup_reroutes", "Node calls re-planned after FAILED_PRECONDITION", ["node"])
    ejections = c("shardrec_lookup_ejections", "Times a shard node was ejected", ["node"])
    outstanding = g(LOOKUP_OUTSTANDING, "Lookup RPCs in flight per shard node", ["node"])
    ejected = g(NODE_EJECTED, "1 while a shard node is ejected", ["node"])
    for node, n in sorted(r.nodes.items()):
        for kind in LOOKUP_KINDS:
            rpcs.add_metric([node, kind], n.rpcs.get(kind, 0))
        for code, k in sorted(n.errors.items()):
            errors.add_metric([node, code], k)
        failovers.add_metric([node], n.failovers)
        reroutes.add_metric([node], n.reroutes)
        ejections.add_metric([node], n.ejections)
        outstanding.add_metric([node], n.outstanding)
        ejected.add_metric([node], 1 if n.ejected else 0)
    fams += [rpcs, errors, failovers, reroutes, ejections, outstanding, ejected]
    fams.append(one(g(QUEUE_DEPTH, "Requests waiting for a batch"), r.queued))
    fams.append(one(g(IN_FLIGHT, "Requests admitted and not answered yet"), r.in_flight))
    fams.append(one(g(ADMISSION_LIMIT, "Concurrency limit of admission control"), r.admission_limit))
    fams.append(one(g("shardrec_shed_p99_seconds", "Server-side time to refuse, p99 of the last 256 refusals"), r.shed_p99_s))
    fams.append(one(g("shardrec_largest_batch", "Largest micro-batch so far"), r.largest_batch))
    fams.append(one(g(MODEL_VERSION, "Model version new batches are computed at"), r.model_version))
    fams.append(one(g(SHARD_MAP_VERSION, "Active shard map version this process routes by"), r.shard_map_version))
    if r.live_nodes is not None:
        fams.append(one(g("shardrec_live_shard_nodes", "Shard nodes registered in this frontend's view"), r.live_nodes))
        fams.append(one(g("shardrec_partitions_without_replica", "Partitions of the active map with no live replica"), r.partitions_without_replica))
    state = g(FEATURE_STORE_STATE, "1 for the feature store's current state (ok, degraded, lost, none)", ["state"])
    for s in FEATURE_STORE_STATES:
        state.add_metric([s], 1 if s == feature_state else 0)
    fams.append(state)
    return fams


# -- the shard --------------------------------------------------------------------------------


@dataclass
class PartitionReading:
    lookups: int = 0
    ids: int = 0
    bags: int = 0
    bytes: int = 0


@dataclass
class ShardReading:
    partitions: dict[tuple[str, str], PartitionReading] = field(default_factory=dict)  # (table, partition) ->
    versions_ready: tuple[int, ...] = ()
    serving_version: int = 0
    target_version: int = 0
    shard_map_version: int = 0
    loads: int = 0
    refusals: int = 0


class ShardMetrics:
    """The shard's metrics on ``registry`` (histograms from any RPC thread; prometheus_client
    locks its own values), and a collector reading ``read()`` at scrape time."""

    def __init__(self, registry: CollectorRegistry, read: Callable[[], ShardReading], *, enabled: bool = True) -> None:
        hist = registry if enabled else None
        self.registry = registry
        self._lookup = _Histograms(hist, SHARD_LOOKUP_LATENCY, "Lookup RPCs handled, receipt to answer, by status code", ("code",), LATENCY_BUCKETS_S)
        self._pooling = _Histograms(hist, SHARD_POOLING, "Pooling time of one Lookup (every group, one snapshot)", (), LATENCY_BUCKETS_S)
        self._load = _Histograms(hist, SHARD_VERSION_LOAD, "Time to load a model version (delta or base), refused ones included", (), LOAD_BUCKETS_S)
        registry.register(_Collector(lambda: _shard_families(read())))

    def lookup_done(self, code: str, seconds: float) -> None:
        self._lookup.child(code).observe(seconds)

    def pooled(self, seconds: float) -> None:
        self._pooling.child().observe(seconds)

    def version_loaded(self, seconds: float) -> None:
        self._load.child().observe(seconds)


def _shard_families(r: ShardReading) -> list:
    c, g = _counter, _gauge
    lookups = c("shardrec_shard_partition_lookups", "Lookups that read a partition", ["table", "partition"])
    ids = c("shardrec_shard_partition_ids", "Ids pooled from a partition", ["table", "partition"])
    bags = c("shardrec_shard_partition_bags", "Bags pooled from a partition", ["table", "partition"])
    held = g(SHARD_PARTITION_BYTES, "Bytes a partition holds over every version (weights and overlays)", ["table", "partition"])
    for (table, part), p in sorted(r.partitions.items()):
        lookups.add_metric([table, part], p.lookups)
        ids.add_metric([table, part], p.ids)
        bags.add_metric([table, part], p.bags)
        held.add_metric([table, part], p.bytes)
    ready = g(SHARD_VERSION_READY, "1 for every model version this node holds ready", ["version"])
    for v in r.versions_ready:
        ready.add_metric([str(v)], 1)
    fams = [lookups, ids, bags, held, ready]
    for name, doc, value in (
        (SHARD_SERVING_VERSION, "The version this node serves by default (its primary)", r.serving_version),
        ("shardrec_shard_target_version", "The target version published in ZooKeeper (0: none yet)", r.target_version),
        (SHARD_MAP_VERSION, "Active shard map version this process routes by", r.shard_map_version),
    ):
        f = g(name, doc)
        f.add_metric([], value)
        fams.append(f)
    loads = c("shardrec_shard_version_loads", "Model version loads by result", ["result"])
    loads.add_metric(["ok"], r.loads)
    loads.add_metric(["refused"], r.refusals)
    fams.append(loads)
    return fams


class _Collector:
    """A prometheus_client custom collector over a function returning metric families."""

    def __init__(self, families: Callable[[], list]) -> None:
        self._families = families

    def collect(self):
        return iter(self._families())

    def describe(self):
        return []  # families vary with the nodes and partitions seen: no fixed description


# -- GetStats, from the registry ----------------------------------------------------------------


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


# Levels that GetStats also repeats among its counters, for readers older than its ``gauges``.
LEGACY_GAUGES = ("queued", "in_flight", "admission_limit", "shed_p99_us", "largest_batch", "view_live_nodes")


def frontend_stats(registry: CollectorRegistry) -> tuple[dict[str, int], dict[str, float]]:
    """``FrontendAdmin.GetStats`` from ``registry``: (counters, gauges) under their legacy names
    (docs/overload.md, docs/fanout.md)."""
    s = Samples(registry)
    t = lambda name, **kw: int(s.sum(name + "_total", **kw))  # noqa: E731 - a counter's sample
    rpcs = lambda kind: int(s.sum(LOOKUP_RPCS + "_total", kind=kind))  # noqa: E731
    counters = {
        "admitted": t("shardrec_admitted"),
        **{f"shed_{r}": t(SHED, reason=r) for r in SHED_REASONS if r != "queue_full"},
        "rejected_queue_full": t(SHED, reason="queue_full"),
        "request_ids_replaced": t("shardrec_request_ids_replaced"),
        "degraded_candidates_capped": t("shardrec_degraded_requests"),
        "batches": t("shardrec_batches"),
        "requests_batched": t("shardrec_batched_requests"),
        "multi_request_batches": t("shardrec_multi_request_batches"),
        "dropped_gone": t("shardrec_dropped_requests", stage="batching"),
        **{f"dropped_{st}": t("shardrec_dropped_requests", stage=st) for st in DROP_STAGES if st != "batching"},
        "answered_too_late": t("shardrec_wasted_requests"),
        "batch_splits": t("shardrec_batch_splits"),
        "item_ids_requested": t("shardrec_item_ids", kind="requested"),
        "item_ids_unique": t("shardrec_item_ids", kind="unique"),
        "redis_round_trips": t("shardrec_feature_store_round_trips"),
        "bags_requested": t("shardrec_bags", kind="requested"),
        "bags_looked_up": t("shardrec_bags", kind="looked_up"),
        "lookup_batches": t("shardrec_lookup_batches"),
        "lookup_rpcs": rpcs("primary"),
        "lookup_failovers": t("shardrec_lookup_failovers"),
        "lookup_reroutes": t("shardrec_lookup_reroutes"),
        "lookup_hedges": rpcs("hedge"),
        "lookup_hedge_wins": t("shardrec_lookup_hedge_wins"),
        "lookup_hedges_cancelled": t("shardrec_lookup_hedges_cancelled"),
        "lookup_stall_retries": rpcs("stall_retry"),
        "lookup_ejections": t("shardrec_lookup_ejections"),
        "lookup_ids_sent": t("shardrec_lookup_ids"),
        "lookup_request_bytes": t("shardrec_lookup_bytes", direction="sent"),
        "lookup_response_bytes": t("shardrec_lookup_bytes", direction="received"),
        **{f"wire_bytes_{side}": int(v) for side, v in s.by("shardrec_wire_bytes_total", "side").items()},
        **{f"node_rpcs_{node}": int(v) for node, v in s.by(LOOKUP_RPCS + "_total", "node").items()},
        **{f"node_ejections_{node}": int(v) for node, v in s.by("shardrec_lookup_ejections_total", "node").items()},
    }
    gauges = {
        "queued": s.sum(QUEUE_DEPTH),
        "in_flight": s.sum(IN_FLIGHT),
        "admission_limit": s.sum(ADMISSION_LIMIT),
        "shed_p99_us": round(s.sum("shardrec_shed_p99_seconds") * 1e6),
        "largest_batch": s.sum("shardrec_largest_batch"),
        "model_version": s.sum(MODEL_VERSION),
        "shard_map_version": s.sum(SHARD_MAP_VERSION),
    }
    if s.has("shardrec_live_shard_nodes"):
        gauges["view_live_nodes"] = s.sum("shardrec_live_shard_nodes")
        gauges["partitions_without_replica"] = s.sum("shardrec_partitions_without_replica")
    return counters, gauges
