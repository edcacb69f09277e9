"""How each table is shaped by the planner: its sharding, partitions (P) and replicas (R), from
a pin, its size and its load, keeping its current shape while acceptable (rule 1 of
docs/placement.md, "Planner"). Pure: no torch, no grpc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from services.core.errors import PlanError
from services.core.placement.plan_types import NodeCapacity, PlannerConfig, TableLoad, unit_load
from services.core.placement.shardmap import TablePlacement, partition_bytes
from services.core.placement.spec import TablePlacementSpec
from services.core.types import ShardingType, TableSpec


@dataclass(frozen=True)
class Shape:
    """One table's sharding, number of partitions (P) and replicas per partition (R)."""

    sharding: ShardingType
    partitions: int
    replicas: int


@dataclass(frozen=True)
class Limits:
    """What bounds every table's shape in one plan."""

    num_nodes: int
    min_replicas: int  # config.min_replicas, clipped to the cluster
    max_partition_bytes: int
    split_load: float  # lookups/s a unit should carry at most: tol x mean node load (0: no load)


def shape_limits(loads: Sequence[TableLoad], nodes: Sequence[NodeCapacity], config: PlannerConfig) -> Limits:
    """The limits ``config`` sets for ``loads`` on ``nodes``."""
    max_part = config.max_partition_bytes
    if max_part is None:  # the median node's: one odd node does not reshape every table
        max_part = max(1, sorted(n.memory_bytes for n in nodes)[(len(nodes) - 1) // 2] // 4)
    mean = sum(t.lookups_per_s for t in loads) / len(nodes)
    return Limits(len(nodes), min(config.min_replicas, len(nodes)), max_part, config.load_tolerance * mean)


def table_shape(t: TableLoad, limits: Limits, config: PlannerConfig, current: TablePlacement | None) -> Shape:
    """The pin; else the current P while acceptable (see PlannerConfig); else the rules'."""
    if t.pinned is not None:
        return _pinned_shape(t.spec, t.pinned, limits.num_nodes)
    ideal = _ideal_shape(t, limits, config)
    if current is None:
        return ideal
    num_parts = current.num_partitions
    keep_load = limits.split_load * config.keep_shape_load_factor
    if ideal.sharding is ShardingType.REPLICATED:
        if num_parts != 1:
            return ideal
        # Extra replicas of a small table cost little and moving them costs loads: keep them.
        replicas = min(max(max(len(r) for r in current.partitions), limits.min_replicas), limits.num_nodes)
        if unit_load(t.lookups_per_s, 1, replicas) > keep_load:
            replicas = max(replicas, ideal.replicas)
        return Shape(ShardingType.REPLICATED, 1, replicas)
    acceptable = num_parts == ideal.partitions or (
        num_parts <= t.spec.rows
        and partition_bytes(t.spec, num_parts, 0) <= limits.max_partition_bytes
        and unit_load(t.lookups_per_s, num_parts, ideal.replicas) <= keep_load
    )
    if not acceptable:
        return ideal
    return Shape(ShardingType.ROW_WISE if num_parts > 1 else ShardingType.TABLE_WISE, num_parts, ideal.replicas)


def _pinned_shape(table: TableSpec, pin: TablePlacementSpec, num_nodes: int) -> Shape:
    replicas = pin.resolve_replicas(num_nodes)
    if not 1 <= replicas <= num_nodes:
        raise PlanError(f"table {table.name!r}: {replicas} replicas but only {num_nodes} nodes")
    if pin.sharding is ShardingType.ROW_WISE and not 2 <= pin.partitions <= table.rows:
        raise PlanError(f"table {table.name!r}: row_wise partitions must be in [2, rows={table.rows}], got {pin.partitions}")
    if pin.sharding is not ShardingType.ROW_WISE and pin.partitions != 1:
        raise PlanError(f"table {table.name!r}: {pin.sharding.value} has exactly 1 partition, got {pin.partitions}")
    return Shape(pin.sharding, pin.partitions, replicas)


def _ideal_shape(t: TableLoad, limits: Limits, config: PlannerConfig) -> Shape:
    spec = t.spec
    if spec.size_bytes <= config.replicate_max_bytes:
        replicas = limits.min_replicas
        if limits.split_load > 0:
            replicas = max(replicas, math.ceil(t.lookups_per_s / limits.split_load))
        return Shape(ShardingType.REPLICATED, 1, min(replicas, limits.num_nodes))
    row_bytes = spec.size_bytes // spec.rows
    rows_per_partition = limits.max_partition_bytes // row_bytes
    if rows_per_partition < 1:
        raise PlanError(
            f"table {spec.name!r}: one row is {row_bytes} B, more than max_partition_bytes={limits.max_partition_bytes}"
        )
    num_parts = -(-spec.rows // rows_per_partition)
    if limits.split_load > 0:
        by_load = math.ceil(t.lookups_per_s / (limits.split_load * limits.min_replicas))
        num_parts = max(num_parts, min(by_load, limits.num_nodes))
    num_parts = min(num_parts, spec.rows)
    sharding = ShardingType.ROW_WISE if num_parts > 1 else ShardingType.TABLE_WISE
    return Shape(sharding, num_parts, limits.min_replicas)
