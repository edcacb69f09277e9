"""The placement planner: tables with their load, nodes with their memory and the current ShardMap
-> a new ShardMap that fits memory, balances lookups per node and moves little
(``initial_shard_map``: the same with every table pinned by a spec). See docs/placement.md
("Planner").

Pure: numpy only, no torch, no grpc, no ZooKeeper. Every function here is a function of its
arguments (deterministic for equal inputs, whatever the order of ``tables``), shares no state
and may be called from any thread.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from services.core.errors import ConfigError, PlanError
from services.core.placement.packing import balance, pack
from services.core.placement.plan_types import UNBOUNDED_BYTES, NodeCapacity, PlannerConfig, TableLoad
from services.core.placement.shaping import shape_limits, table_shape
from services.core.placement.shardmap import ShardMap
from services.core.placement.spec import PlacementSpec
from services.core.types import TableSpec


def plan(
    tables: Sequence[TableLoad],
    nodes: Sequence[NodeCapacity],
    current: ShardMap | None,
    config: PlannerConfig,
    *,
    version: int,
) -> ShardMap:
    """A ShardMap at ``version`` of ``tables`` over ``nodes`` (in that order).

    1. Shape (sharding, P, R) per table: a pin exactly; else a table of at most
       ``replicate_max_bytes`` is replicated, one bigger than ``max_partition_bytes`` is
       row_wise with partitions that fit, the rest table_wise; all split further when hot (see
       PlannerConfig). A table in ``current`` keeps its P while that is still acceptable.
    2. Keep: every replica of ``current`` on a node still present, for tables whose P is
       unchanged (up to R replicas).
    3. A node over its memory gives kept units away (the smallest that frees enough, else the
       biggest, until it fits).
    4. Every missing replica, biggest unit first, goes to the node with room and no replica of
       that partition whose fuller resource after taking it is the least full: lookups/s
       against the mean node load, or bytes against memory x the mean share in use (ties: the
       most free bytes, then the earliest in ``nodes``). Where no node has room, the node
       with the most free bytes that can make room by giving away smaller units does, and
       those are placed again.
    5. Balance lookups: while a node is above ``mean x (1 + tol)`` it gives a unit to the
       least loaded node that can take it; while one is below ``mean x (1 - tol)`` (a new,
       empty node) the most loaded nodes give it units, staying above that bound. Each move
       strictly lowers the larger of the two loads.

    So only nodes that are gone, over memory or outside the load tolerance give partitions
    away (and nodes making room for a partition nothing else can hold). If step 4 still finds
    no room, it is tried once more without keeping ``current`` (everything may move). Raises
    PlanError naming the table and the shortfall when nothing fits, or when a pin asks for
    more replicas than nodes or partitions outside ``[2, rows]``.
    """
    loads = _check_tables(tables)
    _check_nodes(nodes)
    limits = shape_limits(loads, nodes, config)
    shapes = {
        t.spec.name: table_shape(t, limits, config, current.tables.get(t.spec.name) if current is not None else None)
        for t in loads
    }
    try:
        packing = pack(loads, shapes, nodes, current)
    except PlanError:
        if current is None:
            raise
        packing = pack(loads, shapes, nodes, None)  # what was kept may be what blocks a fit
    balance(packing, config.load_tolerance)
    smap = packing.shard_map(version, shapes)
    smap.validate({t.spec.name: t.spec.rows for t in loads})
    return smap


def initial_shard_map(
    spec: PlacementSpec,
    tables: Sequence[TableSpec],
    node_ids: Sequence[str],
    version: int = 1,
) -> ShardMap:
    """The first ShardMap of a cluster: ``plan`` with every table pinned by ``spec``, no load and
    no memory limit. Pure and deterministic.

    Partitions are placed biggest first (ties: table name, then partition); each replica goes
    to the node with the fewest bytes so far among the nodes not yet holding that partition
    (ties go to the earlier node in ``node_ids``). Raises ConfigError naming the table when
    the spec names an unknown table, asks for more replicas than nodes, or row_wise partitions
    outside ``[2, rows]``.
    """
    unknown = sorted(set(spec.tables) - {t.name for t in tables})
    if unknown:
        raise ConfigError(
            f"placement spec names tables the model does not have: {unknown} (model tables: {sorted(t.name for t in tables)})"
        )
    return plan(
        [TableLoad(t, 0.0, spec.for_table(t.name)) for t in tables],
        [NodeCapacity(n, UNBOUNDED_BYTES) for n in node_ids],
        None,
        PlannerConfig(replicate_max_bytes=0),
        version=version,
    )


def _check_tables(tables: Sequence[TableLoad]) -> list[TableLoad]:
    dupes = sorted(n for n, count in Counter(t.spec.name for t in tables).items() if count > 1)
    if dupes:
        raise PlanError(f"table names must be unique, repeated: {dupes}")
    for t in tables:
        if t.spec.rows < 1 or t.spec.dim < 1:
            raise PlanError(f"table {t.spec.name!r}: has no rows (rows={t.spec.rows}, dim={t.spec.dim})")
        if not (math.isfinite(t.lookups_per_s) and t.lookups_per_s >= 0):
            raise PlanError(f"table {t.spec.name!r}: lookups_per_s must be finite and >= 0, got {t.lookups_per_s}")
    return sorted(tables, key=lambda t: t.spec.name)


def _check_nodes(nodes: Sequence[NodeCapacity]) -> None:
    if not nodes:
        raise PlanError("a placement needs at least 1 node")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise PlanError(f"node ids must be unique: {ids}")
    for n in nodes:
        if n.memory_bytes < 0:
            raise PlanError(f"node {n.node_id!r}: memory_bytes must be >= 0, got {n.memory_bytes}")
