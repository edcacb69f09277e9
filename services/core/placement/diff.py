"""What changes between two shard maps (``diff``: the moves) and what one map puts on each node
(``summarize``), for printing a plan before and after. See docs/placement.md ("Planner").
Pure: no torch, no grpc.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from services.core.errors import PlanError
from services.core.placement.plan_types import TableLoad, unit_load
from services.core.placement.shardmap import ShardMap, TablePlacement, bytes_per_node, partition_bytes
from services.core.types import PartitionKey, TableSpec


class MoveKind(str, enum.Enum):
    ADD = "add"  # the node loads the partition
    DROP = "drop"  # the node frees it


@dataclass(frozen=True)
class Move:
    """One node loading or freeing one partition of a table split in ``num_partitions``."""

    table: str
    partition: int
    kind: MoveKind
    node_id: str
    size_bytes: int
    num_partitions: int


@dataclass(frozen=True)
class NodeSummary:
    """What one node holds in a map: its partitions (sorted), their bytes, their expected load."""

    node_id: str
    partitions: tuple[PartitionKey, ...]
    memory_bytes: int
    lookups_per_s: float


def diff(old: ShardMap, new: ShardMap, tables: Sequence[TableSpec]) -> list[Move]:
    """What nodes load and free to go from ``old`` to ``new``: adds first, then drops, each
    sorted by table, partition, node. A table whose P changes drops every old partition and
    adds every new one (rows move between partitions); a table only in one map is all added or
    all dropped. ``tables`` must cover every table of both maps."""
    by_name = _by_name(tables, (old, new), "diff")
    adds: list[Move] = []
    drops: list[Move] = []
    for name in sorted(set(old.tables) | set(new.tables)):
        before, after = old.tables.get(name), new.tables.get(name)
        held_before, held_after = _held(before), _held(after)
        if before is not None and after is not None and before.num_partitions == after.num_partitions:
            held_before, held_after = held_before - held_after, held_after - held_before
        for held, tp, kind, out in ((held_after, after, MoveKind.ADD, adds), (held_before, before, MoveKind.DROP, drops)):
            for p, node in sorted(held):
                assert tp is not None
                size = partition_bytes(by_name[name], tp.num_partitions, p)
                out.append(Move(name, p, kind, node, size, tp.num_partitions))
    return adds + drops


def _held(tp: TablePlacement | None) -> set[tuple[int, str]]:
    return {(p, node) for p, replicas in enumerate(tp.partitions) for node in replicas} if tp is not None else set()


def summarize(smap: ShardMap, tables: Sequence[TableLoad]) -> dict[str, NodeSummary]:
    """Per node of ``smap`` (every node, in map order): its partitions, bytes and expected
    lookups/s (a partition's share ``lookups / P`` split over its replicas)."""
    by_name = _by_name(tables, (smap,), "summarize")
    sizes = bytes_per_node(smap, [t.spec for t in tables])
    parts: dict[str, list[PartitionKey]] = {n: [] for n in smap.nodes}
    load = dict.fromkeys(smap.nodes, 0.0)
    for name in sorted(smap.tables):
        tp = smap.tables[name]
        for p, replicas in enumerate(tp.partitions):
            share = unit_load(by_name[name].lookups_per_s, tp.num_partitions, len(replicas))
            for node in replicas:
                parts[node].append(PartitionKey(name, p))
                load[node] += share
    return {n: NodeSummary(n, tuple(parts[n]), sizes[n], load[n]) for n in smap.nodes}


def _by_name(tables: Sequence[TableSpec] | Sequence[TableLoad], maps: Sequence[ShardMap], caller: str) -> dict:
    """``tables`` by name; PlanError naming a table of ``maps`` that is missing."""
    by_name = {t.spec.name if isinstance(t, TableLoad) else t.name: t for t in tables}
    for smap in maps:
        missing = sorted(set(smap.tables) - set(by_name))
        if missing:
            raise PlanError(f"table {missing[0]!r}: in a shard map but not in the tables given to {caller}")
    return by_name
