"""Packing the planner's units (one replica of one partition) onto nodes: keep what the current
map has, relieve nodes over memory, place what is missing, then balance lookups (rules 2-5 of
docs/placement.md, "Planner"). Pure: numpy only, no torch, no grpc.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np

from services.core.errors import PlanError
from services.core.placement.plan_types import UNBOUNDED_BYTES, NodeCapacity, TableLoad, unit_load
from services.core.placement.shaping import Shape
from services.core.placement.shardmap import ShardMap, TablePlacement, partition_bytes

Unit = tuple[str, int]  # (table, partition): each of its replicas costs its bytes on one node


class Packing:
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
        self.holders: dict[Unit, list[int]] = {}
        self.held: list[set[Unit]] = [set() for _ in nodes]
        self.unit_bytes: dict[Unit, int] = {}
        self.unit_load: dict[Unit, float] = {}

    def add(self, unit: Unit, node: int) -> None:
        self.holders[unit].append(node)
        self._take(unit, node)

    def remove(self, unit: Unit, node: int) -> None:
        self.holders[unit].remove(node)
        self._give(unit, node)

    def move(self, unit: Unit, src: int, dst: int) -> None:
        """The replica on ``src`` goes to ``dst``, in the same place among the replicas."""
        holders = self.holders[unit]
        holders[holders.index(src)] = dst
        self._give(unit, src)
        self._take(unit, dst)

    def _take(self, unit: Unit, node: int) -> None:
        self.held[node].add(unit)
        self.free[node] -= self.unit_bytes[unit]
        self.load[node] += self.unit_load[unit]

    def _give(self, unit: Unit, node: int) -> None:
        self.held[node].discard(unit)
        self.free[node] += self.unit_bytes[unit]
        self.load[node] -= self.unit_load[unit]

    def can_take(self, unit: Unit, node: int) -> bool:
        return self.free[node] >= self.unit_bytes[unit] and node not in self.holders[unit]

    def best_node(self, unit: Unit) -> int | None:
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

    def place_order(self, unit: Unit) -> tuple:
        """Units are placed biggest first, then heaviest first."""
        return (-self.unit_bytes[unit], -self.unit_load[unit], unit)

    def evict(self, node: int, free_bytes: int, smaller_than: float) -> list[Unit]:
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

    def room_by_evicting(self, unit: Unit) -> int | None:
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

    def shard_map(self, version: int, shapes: dict[str, Shape]) -> ShardMap:
        tables = {
            name: TablePlacement(
                shape.sharding,
                tuple(tuple(self.node_ids[i] for i in self.holders[(name, p)]) for p in range(shape.partitions)),
            )
            for name, shape in sorted(shapes.items())
        }
        return ShardMap(version=version, tables=tables, nodes=self.node_ids)


def pack(
    loads: Sequence[TableLoad],
    shapes: dict[str, Shape],
    nodes: Sequence[NodeCapacity],
    current: ShardMap | None,
) -> Packing:
    """Steps 2-4 of ``plan``: keep, relieve memory, place the missing replicas."""
    pk = Packing(nodes)
    for t in loads:
        name, shape = t.spec.name, shapes[t.spec.name]
        for p in range(shape.partitions):
            pk.holders[(name, p)] = []
            pk.unit_bytes[(name, p)] = partition_bytes(t.spec, shape.partitions, p)
            pk.unit_load[(name, p)] = unit_load(t.lookups_per_s, shape.partitions, shape.replicas)
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


def _no_room(pk: Packing, unit: Unit, shapes: dict[str, Shape], nodes: Sequence[NodeCapacity]) -> PlanError:
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


def balance(pk: Packing, tolerance: float) -> None:
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


def _move_out(pk: Packing, donor: int, by_load: list[int], eps: float) -> tuple[Unit, int, int] | None:
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
    pk: Packing, receiver: int, by_load: list[int], low: float, high: float, eps: float
) -> tuple[Unit, int, int] | None:
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
