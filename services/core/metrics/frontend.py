"""The frontend's metrics (``FrontendMetrics``), the counters it reads at scrape time
(``FrontendReading``), and ``GetStats`` from the registry under its legacy names
(``frontend_stats``). docs/observability.md lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from services.core.metrics.base import (
    ADMISSION_LIMIT,
    BATCH_BUCKETS,
    BATCH_SIZE,
    DEGRADED_REASONS,
    DROP_STAGES,
    FEATURE_STORE_FAILURES,
    FEATURE_STORE_STATE,
    FEATURE_STORE_STATES,
    IN_FLIGHT,
    LATENCY_BUCKETS_S,
    LOOKUP_ERROR_CODES,
    LOOKUP_KINDS,
    LOOKUP_LATENCY,
    LOOKUP_OUTSTANDING,
    LOOKUP_RPCS,
    MODEL_VERSION,
    NODE_EJECTED,
    QUEUE_DEPTH,
    RECOMMEND_LATENCY,
    SHARD_MAP_VERSION,
    SHED,
    SHED_REASONS,
    STAGES,
    STAGE_LATENCY,
    Samples,
    _Collector,
    _counter,
    _gauge,
    _Histograms,
)

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
    degraded: dict[str, int] = field(default_factory=dict)  # DEGRADED_REASONS
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
    feature_store: str = "none"  # FEATURE_STORE_STATES
    feature_store_generation: int = 0
    feature_store_lost: int = 0
    feature_store_switches: int = 0
    feature_store_marker_reads: int = 0
    feature_store_default_batches: int = 0
    feature_store_failures: dict[str, int] = field(default_factory=dict)  # FEATURE_STORE_FAILURES
    feature_store_breaker_opens: int = 0
    feature_store_breaker_open: bool = False
    feature_store_reloads: dict[str, int] = field(default_factory=dict)  # ok, failed


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
        self._latency.child("OK")  # its series exist (at 0) before the first call
        for stage in STAGES:
            self._stage.child(stage)
        self.read = read
        registry.register(_Collector(lambda: _frontend_families(self.read())))

    def request_done(self, code: str, seconds: float) -> None:
        self._latency.child(code).observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.child(stage).observe(seconds)

    def batch(self, size: int) -> None:
        self._batch.child().observe(size)

    def lookup(self, node: str, seconds: float) -> None:
        self._lookup.child(node).observe(seconds)


def _single(kind, rows) -> list:
    """One unlabelled family per ``(name, doc, value)`` row."""
    out = []
    for name, doc, value in rows:
        f = kind(name, doc)
        f.add_metric([], value)
        out.append(f)
    return out


def _by(f, label_values, counts) -> object:
    """``f`` with one sample per label value (0 where ``counts`` has none)."""
    for v in label_values:
        f.add_metric([v], counts.get(v, 0))
    return f


def _frontend_families(r: FrontendReading) -> list:
    c, g = _counter, _gauge
    fams = _single(c, (
        ("shardrec_admitted", "Recommend calls admitted", r.admitted),
        ("shardrec_wasted_requests", "Answers computed in full for callers already gone", r.wasted),
        ("shardrec_request_ids_replaced", "Unusable request ids replaced by generated ones", r.request_ids_replaced),
        ("shardrec_batches", "Micro-batches formed", r.batches),
        ("shardrec_batched_requests", "Requests that joined a micro-batch", r.batched_requests),
        ("shardrec_multi_request_batches", "Micro-batches of more than one request", r.multi_request_batches),
        ("shardrec_batch_splits", "Failed batches split to isolate the request at fault", r.batch_splits),
        ("shardrec_feature_store_round_trips", "Feature store (Redis) round trips", r.feature_store_round_trips),
        ("shardrec_lookup_batches", "Micro-batches sent to the lookup step", r.lookup_batches),
        ("shardrec_lookup_hedge_wins", "Hedge RPCs whose answer was used", r.lookup_hedge_wins),
        ("shardrec_lookup_hedges_cancelled", "Lookup RPCs cancelled: late calls a hedge beat, hedges not needed", r.lookup_hedges_cancelled),
        ("shardrec_lookup_ids", "Ids sent to shards", r.lookup_ids),
        ("shardrec_feature_store_lost", "Times the feature store was found lost (Redis answered without its marker)", r.feature_store_lost),
        ("shardrec_feature_store_generation_switches", "Feature store generations followed (reloads seen)", r.feature_store_switches),
        ("shardrec_feature_store_marker_reads", "Reads of the feature store's marker alone", r.feature_store_marker_reads),
        ("shardrec_feature_store_default_batches", "Batches answered with feature defaults (store lost, operator's choice)", r.feature_store_default_batches),
        ("shardrec_feature_store_breaker_opens", "Times the feature store's circuit breaker opened", r.feature_store_breaker_opens),
    ))  # fmt: skip
    fams += [
        _by(c(SHED, "Recommend calls refused for load, by reason", ["reason"]), SHED_REASONS, r.shed),
        _by(c("shardrec_dropped_requests", "Dead requests (deadline passed or caller gone) dropped before a stage", ["stage"]), DROP_STAGES, r.dropped),
        _by(c("shardrec_degraded_requests", "Requests answered in a degraded mode, by reason", ["reason"]), DEGRADED_REASONS, r.degraded),
        _by(c("shardrec_item_ids", "Candidate item ids per batch: requested, and unique after dedup", ["kind"]), ("requested", "unique"),
            {"requested": r.item_ids_requested, "unique": r.item_ids_unique}),
        _by(c("shardrec_bags", "Bags the batches needed, and the distinct bags looked up", ["kind"]), ("requested", "looked_up"),
            {"requested": r.bags_requested, "looked_up": r.bags_looked_up}),
        _by(c("shardrec_lookup_bytes", "Lookup payload bytes: sent (request) and received (answers)", ["direction"]), ("sent", "received"),
            {"sent": r.lookup_bytes_sent, "received": r.lookup_bytes_received}),
        _by(c("shardrec_wire_bytes", "Embedding bytes on the wire (ids out, pooled vectors back) by feature side", ["side"]), ("user", "item"), r.wire_bytes),
        _by(c("shardrec_feature_store_failures", "Failed feature store calls: timeout, error, fast_failure (refused by the open breaker)", ["kind"]),
            FEATURE_STORE_FAILURES, r.feature_store_failures),
        _by(c("shardrec_feature_store_reloads", "Reloads of a lost feature store by this frontend, by result", ["result"]), ("ok", "failed"), r.feature_store_reloads),
        _by(g(FEATURE_STORE_STATE, "1 for the feature store's current state (ok, lost, unreachable, none)", ["state"]), FEATURE_STORE_STATES,
            {r.feature_store: 1}),
    ]  # fmt: skip
    fams += _node_families(r)
    fams += _single(g, (
        (QUEUE_DEPTH, "Requests waiting for a batch", r.queued),
        (IN_FLIGHT, "Requests admitted and not answered yet", r.in_flight),
        (ADMISSION_LIMIT, "Concurrency limit of admission control", r.admission_limit),
        ("shardrec_shed_p99_seconds", "Server-side time to refuse, p99 of the last 256 refusals", r.shed_p99_s),
        ("shardrec_largest_batch", "Largest micro-batch so far", r.largest_batch),
        (MODEL_VERSION, "Model version new batches are computed at", r.model_version),
        (SHARD_MAP_VERSION, "Active shard map version this process routes by", r.shard_map_version),
        ("shardrec_feature_store_generation", "The feature store generation last seen (0: none)", r.feature_store_generation),
        ("shardrec_feature_store_breaker_open", "1 while the feature store's circuit breaker is open", 1 if r.feature_store_breaker_open else 0),
    ))  # fmt: skip
    if r.live_nodes is not None:
        fams += _single(g, (
            ("shardrec_live_shard_nodes", "Shard nodes registered in this frontend's view", r.live_nodes),
            ("shardrec_partitions_without_replica", "Partitions of the active map with no live replica", r.partitions_without_replica),
        ))  # fmt: skip
    return fams


def _node_families(r: FrontendReading) -> list:
    c, g = _counter, _gauge
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
        for code, k in sorted({**dict.fromkeys(LOOKUP_ERROR_CODES, 0), **n.errors}.items()):
            errors.add_metric([node, code], k)
        failovers.add_metric([node], n.failovers)
        reroutes.add_metric([node], n.reroutes)
        ejections.add_metric([node], n.ejections)
        outstanding.add_metric([node], n.outstanding)
        ejected.add_metric([node], 1 if n.ejected else 0)
    return [rpcs, errors, failovers, reroutes, ejections, outstanding, ejected]


# Levels that GetStats also repeats among its counters, for readers older than its ``gauges``.
LEGACY_GAUGES = (
    "queued", "in_flight", "admission_limit", "shed_p99_us", "largest_batch", "view_live_nodes",
    "feature_store_state", "feature_store_generation", "redis_breaker_open",
)  # fmt: skip


def _state(s: Samples) -> str:
    return next((st for st, v in s.by(FEATURE_STORE_STATE, "state").items() if v == 1), "none")


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
        "degraded_candidates_capped": t("shardrec_degraded_requests", reason="candidates_capped"),
        "degraded_feature_defaults": t("shardrec_degraded_requests", reason="feature_defaults"),
        "feature_store_lost_total": t("shardrec_feature_store_lost"),
        "feature_store_switches": t("shardrec_feature_store_generation_switches"),
        "feature_store_marker_reads": t("shardrec_feature_store_marker_reads"),
        "feature_store_defaults_batches": t("shardrec_feature_store_default_batches"),
        "redis_timeouts": t("shardrec_feature_store_failures", kind="timeout"),
        "redis_errors": t("shardrec_feature_store_failures", kind="error"),
        "redis_fast_failures": t("shardrec_feature_store_failures", kind="fast_failure"),
        "redis_breaker_opens": t("shardrec_feature_store_breaker_opens"),
        "feature_syncs": t("shardrec_feature_store_reloads", result="ok"),
        "feature_sync_failures": t("shardrec_feature_store_reloads", result="failed"),
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
        # FeatureStoreState's values: OK 0 (also without a store), LOST 1, UNREACHABLE 2
        "feature_store_state": float({"lost": 1, "unreachable": 2}.get(_state(s), 0)),
        "feature_store_generation": s.sum("shardrec_feature_store_generation"),
        "redis_breaker_open": s.sum("shardrec_feature_store_breaker_open"),
    }
    if s.has("shardrec_live_shard_nodes"):
        gauges["view_live_nodes"] = s.sum("shardrec_live_shard_nodes")
        gauges["partitions_without_replica"] = s.sum("shardrec_partitions_without_replica")
    return counters, gauges
