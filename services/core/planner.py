"""Placement planner: tables with their load, nodes with their memory and the current ShardMap ->
a new ShardMap that fits memory, balances lookups per node and moves little.

Pure module: numpy only, no torch, no grpc, no ZooKeeper. Every function here is a function of
its arguments (deterministic for equal inputs, whatever the order of ``tables``), shares no
state and may be called from any thread. ``diff`` says what a shard would load and free to go
from one map to another; ``summarize`` gives each node's partitions, bytes and expected
lookups/s, for printing before and after. See docs/placement.md ("Planner").

A *unit* below is one replica of one partition: ``(table, partition)`` on one node. It costs
the partition's bytes on that node and carries ``lookups_per_s / (P * R)`` of its table's load
(a row-wise partition gets lookups/P, row ``r % P`` spreads the hot low ids; a partition's
load splits evenly over its R replicas).
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.core.errors import ConfigError, PlanError
from services.core.placement import (
    PlacementSpec,
    ShardMap,
    TablePlacement,
    TablePlacementSpec,
    bytes_per_node,
    partition_bytes,
)
from services.core.types import PartitionKey, ShardingType, TableSpec

# Memory of a node whose memory is not a constraint (plan_from_spec); fits numpy int64 sums.
UNBOUNDED_BYTES = 2**62

_Unit = tuple[str, int]  # (table, partition)


@dataclass(frozen=True)
class TableLoad:
    """What the planner knows about one table: its size (``spec``: bytes = rows x dim x 4), the
    ids looked up in it per second (measured from shard counters, or expected), and an
    operator's ``pinned`` placement (sharding, partitions and replicas kept exactly)."""

    spec: TableSpec
    lookups_per_s: float
    pinned: TablePlacementSpec | None = None


@dataclass(frozen=True)
class NodeCapacity:
    """One shard node and the embedding bytes it may hold."""

    node_id: str
    memory_bytes: int


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's rules.

    - ``replicate_max_bytes``: a table at most this big is ``replicated`` (a bag pooled in one
      RPC), on ``min_replicas`` nodes, more when it is hot.
    - ``min_replicas``: every partition of an unpinned table is on at least this many nodes
      (fewer only when the cluster has fewer nodes).
    - ``max_partition_bytes``: a table bigger than this is ``row_wise`` with P chosen so every
      partition fits (None: the median node memory / 4).
    - ``load_tolerance``: the plan aims at every node's lookups/s within ``mean x (1 +- tol)``;
      a table is also split (more partitions, or replicas when replicated) until one unit
      carries at most ``tol x`` the mean node load, so a greedy packing can meet the aim.
    - ``keep_shape_load_factor``: an unpinned table keeps its current partition count while
      that still fits ``max_partition_bytes`` and its units carry at most this many times the
      split target (hysteresis: a small change of load does not reshape a table); a
      replicated table keeps its replicas too (within ``[min_replicas, nodes]``), others go
      back to ``min_replicas``.
    """

    replicate_max_bytes: int
    min_replicas: int = 2
    max_partition_bytes: int | None = None
    load_tolerance: float = 0.2
    keep_shape_load_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.replicate_max_bytes < 0:
            raise ConfigError(f"planner: replicate_max_bytes must be >= 0, got {self.replicate_max_bytes}")
        if self.min_replicas < 1:
            raise ConfigError(f"planner: min_replicas must be >= 1, got {self.min_replicas}")
        if self.max_partition_bytes is not None and self.max_partition_bytes < 1:
            raise ConfigError(f"planner: max_partition_bytes must be >= 1, got {self.max_partition_bytes}")
        if not 0 < self.load_tolerance < 1:
            raise ConfigError(f"planner: load_tolerance must be in (0, 1), got {self.load_tolerance}")
        if self.keep_shape_load_factor < 1:
            raise ConfigError(f"planner: keep_shape_load_factor must be >= 1, got {self.keep_shape_load_factor}")


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


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


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
    limits = _limits(loads, nodes, config)
    shapes = {
        t.spec.name: _shape(t, limits, config, current.tables.get(t.spec.name) if current is not None else None)
        for t in loads
    }
    try:
        packing = _pack(loads, shapes, nodes, current)
    except PlanError:
        if current is None:
            raise
        packing = _pack(loads, shapes, nodes, None)  # what was kept may be what blocks a fit
    _balance(packing, config.load_tolerance)
    smap = packing.shard_map(version, shapes)
    smap.validate({t.spec.name: t.spec.rows for t in loads})
    return smap


def plan_from_spec(
    spec: PlacementSpec, tables: Sequence[TableSpec], node_ids: Sequence[str], version: int = 1
) -> ShardMap:
    """The planner with every table pinned by ``spec``, no load and no memory limit: the
    biggest partition first (ties: table name, partition), each replica on the node with the
    fewest bytes so far (ties: the earlier node). This is ``placement.initial_shard_map``."""
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


# --------------------------------------------------------------------------------------------
# diff and summarize
# --------------------------------------------------------------------------------------------


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
            share = _unit_load(by_name[name].lookups_per_s, tp.num_partitions, len(replicas))
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


def _unit_load(lookups_per_s: float, num_partitions: int, replicas: int) -> float:
    """Lookups/s one replica of one partition carries."""
    return lookups_per_s / (num_partitions * replicas)


# --------------------------------------------------------------------------------------------
# shapes: sharding, partitions and replicas per table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    sharding: ShardingType
    partitions: int
    replicas: int


@dataclass(frozen=True)
class _Limits:
    num_nodes: int
    min_replicas: int  # config.min_replicas, clipped to the cluster
    max_partition_bytes: int
    split_load: float  # lookups/s a unit should carry at most: tol x mean node load (0: no load)


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


def _limits(loads: Sequence[TableLoad], nodes: Sequence[NodeCapacity], config: PlannerConfig) -> _Limits:
    max_part = config.max_partition_bytes
    if max_part is None:  # the median node's: one odd node does not reshape every table
        max_part = max(1, sorted(n.memory_bytes for n in nodes)[(len(nodes) - 1) // 2] // 4)
    mean = sum(t.lookups_per_s for t in loads) / len(nodes)
    return _Limits(len(nodes), min(config.min_replicas, len(nodes)), max_part, config.load_tolerance * mean)


def _shape(t: TableLoad, limits: _Limits, config: PlannerConfig, current: TablePlacement | None) -> _Shape:
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
        if _unit_load(t.lookups_per_s, 1, replicas) > keep_load:
            replicas = max(replicas, ideal.replicas)
        return _Shape(ShardingType.REPLICATED, 1, replicas)
    acceptable = num_parts == ideal.partitions or (
        num_parts <= t.spec.rows
        and partition_bytes(t.spec, num_parts, 0) <= limits.max_partition_bytes
        and _unit_load(t.lookups_per_s, num_parts, ideal.replicas) <= keep_load
    )
    if not acceptable:
        return ideal
    return _Shape(ShardingType.ROW_WISE if num_parts > 1 else ShardingType.TABLE_WISE, num_parts, ideal.replicas)


def _pinned_shape(table: TableSpec, pin: TablePlacementSpec, num_nodes: int) -> _Shape:
    replicas = pin.resolve_replicas(num_nodes)
    if not 1 <= replicas <= num_nodes:
        raise PlanError(f"table {table.name!r}: {replicas} replicas but only {num_nodes} nodes")
    if pin.sharding is ShardingType.ROW_WISE and not 2 <= pin.partitions <= table.rows:
        raise PlanError(f"table {table.name!r}: row_wise partitions must be in [2, rows={table.rows}], got {pin.partitions}")
    if pin.sharding is not ShardingType.ROW_WISE and pin.partitions != 1:
        raise PlanError(f"table {table.name!r}: {pin.sharding.value} has exactly 1 partition, got {pin.partitions}")
    return _Shape(pin.sharding, pin.partitions, replicas)


def _ideal_shape(t: TableLoad, limits: _Limits, config: PlannerConfig) -> _Shape:
    spec = t.spec
    if spec.size_bytes <= config.replicate_max_bytes:
        replicas = limits.min_replicas
        if limits.split_load > 0:
            replicas = max(replicas, math.ceil(t.lookups_per_s / limits.split_load))
        return _Shape(ShardingType.REPLICATED, 1, min(replicas, limits.num_nodes))
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
    return _Shape(sharding, num_parts, limits.min_replicas)


# --------------------------------------------------------------------------------------------
# packing units onto nodes
# --------------------------------------------------------------------------------------------


class _Packing:
    """The working state of one plan() call: which nodes hold each unit, and each node's free
    bytes and lookups/s. Nodes are indices into ``node_ids``."""

    def __init__(self, nodes: Sequence[NodeCapacity]) -> None:
        self.node_ids = tuple(n.node_id for n in nodes)
        self.index = {n: i for i, n in enumerate(self.node_ids)}
        self.memory = np.array([min(n.memory_bytes, UNBOUNDED_BYTES) for n in nodes], dtype=np.int64)
        self.free = self.memory.copy()
        self.mean_load = 0.0  # lookups/s per node when every unit is placed
        self.mean_fill = 1.0  # share of memory in use when every unit is placed
        self.load = np.zeros(len(nodes))
        self.holders: dict[_Unit, list[int]] = {}
        self.held: list[set[_Unit]] = [set() for _ in nodes]
        self.unit_bytes: dict[_Unit, int] = {}
        self.unit_load: dict[_Unit, float] = {}

    def add(self, unit: _Unit, node: int) -> None:
        self.holders[unit].append(node)
        self._take(unit, node)

    def remove(self, unit: _Unit, node: int) -> None:
        self.holders[unit].remove(node)
        self._give(unit, node)

    def move(self, unit: _Unit, src: int, dst: int) -> None:
        """The replica on ``src`` goes to ``dst``, in the same place among the replicas."""
        holders = self.holders[unit]
        holders[holders.index(src)] = dst
        self._give(unit, src)
        self._take(unit, dst)

    def _take(self, unit: _Unit, node: int) -> None:
        self.held[node].add(unit)
        self.free[node] -= self.unit_bytes[unit]
        self.load[node] += self.unit_load[unit]

    def _give(self, unit: _Unit, node: int) -> None:
        self.held[node].discard(unit)
        self.free[node] += self.unit_bytes[unit]
        self.load[node] -= self.unit_load[unit]

    def can_take(self, unit: _Unit, node: int) -> bool:
        return self.free[node] >= self.unit_bytes[unit] and node not in self.holders[unit]

    def best_node(self, unit: _Unit) -> int | None:
        """The node with room and no replica of ``unit`` whose fuller resource, after taking
        it, is the least full: lookups/s over the mean node load, or bytes in use over memory
        x the mean share of memory in use (1.0 = on the mean for both); ties go to the most
        free bytes, then the lowest index. None when no node can take it."""
        size = self.unit_bytes[unit]
        ok = self.free >= size
        ok[self.holders[unit]] = False
        cand = np.flatnonzero(ok)
        if cand.size == 0:
            return None
        fill = (self.memory[cand] - self.free[cand] + size) / (self.memory[cand] * self.mean_fill)
        if self.mean_load > 0:
            fill = np.maximum(fill, (self.load[cand] + self.unit_load[unit]) / self.mean_load)
        cand = cand[fill == fill.min()]
        cand = cand[self.free[cand] == self.free[cand].max()]
        return int(cand[0])

    def place_order(self, unit: _Unit) -> tuple:
        """Units are placed biggest first, then heaviest first."""
        return (-self.unit_bytes[unit], -self.unit_load[unit], unit)

    def evict(self, node: int, free_bytes: int, smaller_than: float) -> list[_Unit]:
        """Remove units smaller than ``smaller_than`` from ``node`` until it has ``free_bytes``
        free (or nothing more to remove): the smallest unit that frees enough, else the
        biggest, again. Returns the removed units."""
        removed = []
        while self.free[node] < free_bytes:
            short = free_bytes - int(self.free[node])
            units = [u for u in self.held[node] if self.unit_bytes[u] < smaller_than]
            if not units:
                break
            enough = [u for u in units if self.unit_bytes[u] >= short]
            unit = min(enough, key=lambda u: (self.unit_bytes[u], u)) if enough else max(units, key=lambda u: (self.unit_bytes[u], u))
            self.remove(unit, node)
            removed.append(unit)
        return removed

    def room_by_evicting(self, unit: _Unit) -> int | None:
        """The node without a replica of ``unit`` that can make room for it by giving away
        only smaller units, and has the most free bytes (ties: the lowest index); None if none.
        Evicting only smaller units, which are then placed again, always ends."""
        size = self.unit_bytes[unit]
        best = None
        for node in range(len(self.node_ids)):
            if node in self.holders[unit]:
                continue
            smaller = sum(self.unit_bytes[u] for u in self.held[node] if self.unit_bytes[u] < size)
            if self.free[node] + smaller >= size and (best is None or self.free[node] > self.free[best]):
                best = node
        return best

    def shard_map(self, version: int, shapes: dict[str, _Shape]) -> ShardMap:
        tables = {
            name: TablePlacement(
                shape.sharding,
                tuple(tuple(self.node_ids[i] for i in self.holders[(name, p)]) for p in range(shape.partitions)),
            )
            for name, shape in sorted(shapes.items())
        }
        return ShardMap(version=version, tables=tables, nodes=self.node_ids)


def _pack(
    loads: Sequence[TableLoad],
    shapes: dict[str, _Shape],
    nodes: Sequence[NodeCapacity],
    current: ShardMap | None,
) -> _Packing:
    """Steps 2-4 of ``plan``: keep, relieve memory, place the missing replicas."""
    pk = _Packing(nodes)
    for t in loads:
        name, shape = t.spec.name, shapes[t.spec.name]
        for p in range(shape.partitions):
            pk.holders[(name, p)] = []
            pk.unit_bytes[(name, p)] = partition_bytes(t.spec, shape.partitions, p)
            pk.unit_load[(name, p)] = _unit_load(t.lookups_per_s, shape.partitions, shape.replicas)
        tp = current.tables.get(name) if current is not None else None
        if tp is not None and tp.num_partitions == shape.partitions:
            for p, replicas in enumerate(tp.partitions):
                for node in [n for n in replicas if n in pk.index][: shape.replicas]:
                    pk.add((name, p), pk.index[node])
    for node in range(len(nodes)):
        pk.evict(node, 0, math.inf)  # a node over its memory gives units away
    pk.mean_load = sum(t.lookups_per_s for t in loads) / len(nodes)
    pk.mean_fill = sum(pk.unit_bytes[u] * shapes[u[0]].replicas for u in pk.unit_bytes) / max(1, int(pk.memory.sum()))
    missing = [
        unit
        for unit, holders in pk.holders.items()
        for _ in range(shapes[unit[0]].replicas - len(holders))
    ]
    queue = [(pk.place_order(u), u) for u in missing]
    heapq.heapify(queue)
    while queue:
        _, unit = heapq.heappop(queue)
        node = pk.best_node(unit)
        if node is None:
            node = pk.room_by_evicting(unit)
            if node is None:
                raise _no_room(pk, unit, shapes, nodes)
            for u in pk.evict(node, pk.unit_bytes[unit], pk.unit_bytes[unit]):
                heapq.heappush(queue, (pk.place_order(u), u))
        pk.add(unit, node)
    return pk


def _no_room(pk: _Packing, unit: _Unit, shapes: dict[str, _Shape], nodes: Sequence[NodeCapacity]) -> PlanError:
    name, p = unit
    size = pk.unit_bytes[unit]
    others = [i for i in range(len(pk.node_ids)) if i not in pk.holders[unit]]
    best = max(others, key=lambda i: (int(pk.free[i]), -i))
    free = int(pk.free[best])
    need = sum(pk.unit_bytes[u] * shapes[u[0]].replicas for u in pk.unit_bytes)
    have = sum(min(n.memory_bytes, UNBOUNDED_BYTES) for n in nodes)
    return PlanError(
        f"table {name!r} partition {p} ({size} B): no node without a replica of it has room; the most free is "
        f"{pk.node_ids[best]!r} with {free} B, short by {size - free} B "
        f"(all tables need {need} B, the nodes have {have} B)"
    )


# --------------------------------------------------------------------------------------------
# balancing lookups
# --------------------------------------------------------------------------------------------


def _balance(pk: _Packing, tolerance: float) -> None:
    """Step 5 of ``plan``: move single units until every node's lookups/s is within
    ``mean x (1 +- tolerance)`` or no move helps. Every move lowers the sum of squared node
    loads, so this ends; the step cap is a second guard."""
    num_nodes = len(pk.node_ids)
    mean = float(pk.load.sum()) / num_nodes
    if mean <= 0:
        return
    high, low, eps = mean * (1 + tolerance), mean * (1 - tolerance), mean * 1e-9
    for _ in range(2 * len(pk.unit_bytes) + num_nodes):
        by_load = np.argsort(pk.load, kind="stable").tolist()
        move = None
        for donor in reversed(by_load):
            if pk.load[donor] <= high + eps:
                break
            move = _move_out(pk, donor, by_load, eps)
            if move is not None:
                break
        if move is None and pk.load[by_load[0]] < low - eps:
            move = _move_in(pk, by_load[0], by_load, low, high, eps)
        if move is None:
            return
        pk.move(*move)


def _move_out(pk: _Packing, donor: int, by_load: list[int], eps: float) -> tuple[_Unit, int, int] | None:
    """The unit of ``donor`` and its least loaded possible receiver that lower the larger of
    the two loads the most (ties: fewer bytes, then the unit)."""
    best: tuple | None = None
    for unit in pk.held[donor]:
        share = pk.unit_load[unit]
        if share <= 0:
            continue
        dst = next((n for n in by_load if n != donor and pk.can_take(unit, n)), None)
        if dst is None:
            continue
        peak = max(pk.load[donor] - share, pk.load[dst] + share)
        candidate = (peak, pk.unit_bytes[unit], unit, dst)
        if peak < pk.load[donor] - eps and (best is None or candidate < best):
            best = candidate
    return (best[2], donor, best[3]) if best is not None else None


def _move_in(
    pk: _Packing, receiver: int, by_load: list[int], low: float, high: float, eps: float
) -> tuple[_Unit, int, int] | None:
    """A unit for the underloaded ``receiver`` from the most loaded node that can give one
    without falling below ``low`` or lifting the receiver above ``high``."""
    for donor in reversed(by_load):
        if pk.load[donor] <= pk.load[receiver] + eps:
            return None
        best: tuple | None = None
        for unit in pk.held[donor]:
            share = pk.unit_load[unit]
            if share <= 0 or not pk.can_take(unit, receiver):
                continue
            if pk.load[donor] - share < low - eps or pk.load[receiver] + share > high + eps:
                continue
            candidate = (max(pk.load[donor] - share, pk.load[receiver] + share), pk.unit_bytes[unit], unit)
            if best is None or candidate < best:
                best = candidate
        if best is not None:
            return (best[2], donor, receiver)
    return None
