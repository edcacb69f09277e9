"""Placement: which node holds which partition of which table. See docs/placement.md.

Modules, each importing only those above it: ``spec`` (the placement spec file), ``shardmap``
(ShardMap and the sizes it implies), ``plan_types`` (what the planner is given), ``shaping``
(sharding, partitions and replicas per table), ``packing`` (units onto nodes, load balance),
``planner`` (``plan``, ``initial_shard_map``), ``diff`` (moves between maps, per-node summary).
Pure: numpy only, no torch, no grpc, no kazoo. The main names are re-exported here.
"""

from services.core.placement.diff import Move, MoveKind, NodeSummary, diff, summarize
from services.core.placement.plan_types import NodeCapacity, PlannerConfig, TableLoad
from services.core.placement.planner import initial_shard_map, plan
from services.core.placement.shardmap import (
    ShardMap,
    TablePlacement,
    bytes_per_node,
    node_ids,
    owned_partitions,
    partition_bytes,
    partition_rows,
)
from services.core.placement.spec import REPLICAS_ALL, PlacementSpec, TablePlacementSpec, load_placement_spec

__all__ = [
    "REPLICAS_ALL",
    "Move",
    "MoveKind",
    "NodeCapacity",
    "NodeSummary",
    "PlacementSpec",
    "PlannerConfig",
    "ShardMap",
    "TableLoad",
    "TablePlacement",
    "TablePlacementSpec",
    "bytes_per_node",
    "diff",
    "initial_shard_map",
    "load_placement_spec",
    "node_ids",
    "owned_partitions",
    "partition_bytes",
    "partition_rows",
    "plan",
    "summarize",
]
