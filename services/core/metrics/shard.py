"""The shard's metrics (``ShardMetrics``) and the counters it reads at scrape time
(``ShardReading``). docs/observability.md lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from services.core.metrics.base import (
    LATENCY_BUCKETS_S,
    LOAD_BUCKETS_S,
    SHARD_LOOKUP_LATENCY,
    SHARD_MAP_VERSION,
    SHARD_PARTITION_BYTES,
    SHARD_POOLING,
    SHARD_SERVING_VERSION,
    SHARD_VERSION_LOAD,
    SHARD_VERSION_READY,
    _Collector,
    _counter,
    _gauge,
    _Histograms,
)

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
        self._lookup.child("OK")  # its series exist (at 0) before the first Lookup
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
