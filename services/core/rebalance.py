"""Live rebalancing, the pure parts: what a plan asks of the planner, the plan file, and how far
a move has got, from the nodes' znodes. ``services.control.rebalance`` does the ZooKeeper I/O
around them; docs/placement.md ("Rebalancing") tells the lifecycle.

Pure module: no torch, no grpc, no ZooKeeper. Every function is a function of its arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.errors import ConfigError
from services.core.placement import (
    REPLICAS_ALL,
    MoveKind,
    NodeCapacity,
    PlannerConfig,
    ShardMap,
    TableLoad,
    TablePlacementSpec,
    diff,
    plan,
)
from services.core.types import PartitionId, ShardingType, TableSpec

if TYPE_CHECKING:
    from services.core.discovery.records import FrontendRecord, NodeRecord

PLAN_FORMAT = "shardrec.rebalance-plan/v1"

# --------------------------------------------------------------------------------------------
# what to plan
# --------------------------------------------------------------------------------------------


def kept_shape(current: ShardMap, table: str, num_nodes: int) -> TablePlacementSpec:
    """A pin that keeps a table's current sharding, P and R (only replicas move): R clipped to
    the cluster, and a table on every current node stays on every node."""
    tp = current.tables[table]
    replicas = max(len(r) for r in tp.partitions)
    if tp.sharding is ShardingType.REPLICATED and all(len(r) == len(current.nodes) for r in tp.partitions):
        return TablePlacementSpec(tp.sharding, 1, REPLICAS_ALL)
    replicas = min(replicas, num_nodes)
    if tp.sharding is ShardingType.REPLICATED and replicas < 2:
        return TablePlacementSpec(ShardingType.TABLE_WISE, 1, replicas)
    return TablePlacementSpec(tp.sharding, tp.num_partitions, replicas)


def next_node_ids(current: Sequence[str], count: int) -> list[str]:
    """``count`` new node ids ``shard-<k>``, the smallest k not in ``current``."""
    out: list[str] = []
    k = 0
    while len(out) < count:
        node = f"shard-{k}"
        if node not in current:
            out.append(node)
        k += 1
    return out


@dataclass(frozen=True)
class PlanRequest:
    """What the operator asked for: nodes added or removed, tables pinned, and whether the
    planner may reshape the tables not pinned (``rebalance``; otherwise they keep their
    sharding, P and R, and only replicas move)."""

    add_nodes: int = 0
    remove_nodes: tuple[str, ...] = ()
    sets: tuple[tuple[str, TablePlacementSpec], ...] = ()
    rebalance: bool = False

    def __post_init__(self) -> None:
        if self.add_nodes < 0:
            raise ConfigError(f"--add-nodes must be >= 0, got {self.add_nodes}")
        if not (self.add_nodes or self.remove_nodes or self.sets or self.rebalance):
            raise ConfigError("nothing to plan: give --add-nodes, --remove-node, --set or --rebalance")

    def to_json(self) -> dict[str, Any]:
        return {
            "add_nodes": self.add_nodes,
            "remove_nodes": list(self.remove_nodes),
            "set": {t: pin.to_json() for t, pin in self.sets},
            "rebalance": self.rebalance,
        }


def plan_target(
    current: ShardMap,
    tables: Sequence[TableSpec],
    lookups_per_s: Mapping[str, float],
    request: PlanRequest,
    *,
    node_memory_bytes: int,
    config: PlannerConfig,
) -> ShardMap:
    """The target map (version ``current.version + 1``) for ``request``, planned from the
    current map, the measured ``lookups_per_s`` per table and a memory of
    ``node_memory_bytes`` per node (``services.core.placement.plan``)."""
    unknown = sorted(set(request.remove_nodes) - set(current.nodes))
    if unknown:
        raise ConfigError(f"--remove-node {unknown[0]!r}: not a node of the active map (nodes: {list(current.nodes)})")
    names = {t.name for t in tables}
    pinned = dict(request.sets)
    for table in pinned:
        if table not in names:
            raise ConfigError(f"--set {table!r}: the model has no such table (tables: {sorted(names)})")
    nodes = [n for n in current.nodes if n not in request.remove_nodes]
    nodes += next_node_ids(current.nodes, request.add_nodes)
    if not nodes:
        raise ConfigError("the plan leaves no node")
    if not request.rebalance:
        for t in tables:
            if t.name not in pinned and t.name in current.tables:
                pinned[t.name] = kept_shape(current, t.name, len(nodes))
    loads = [TableLoad(t, float(lookups_per_s.get(t.name, 0.0)), pinned.get(t.name)) for t in tables]
    capacity = [NodeCapacity(n, node_memory_bytes) for n in nodes]
    return plan(loads, capacity, current, config, version=current.version + 1)


def measured_load(nodes: Mapping[str, NodeRecord]) -> dict[str, float]:
    """Ids looked up per second per table, summed over every partition every live node
    reports (``held[...].ids_per_s`` in its znode)."""
    out: dict[str, float] = {}
    for node in nodes.values():
        for name, h in node.held.items():
            table = name.rpartition("/")[0]
            out[table] = out.get(table, 0.0) + h.ids_per_s
    return out


# --------------------------------------------------------------------------------------------
# the plan file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebalancePlan:
    """A plan file: the cluster and active map version it was made against, and the target."""

    cluster: str
    base_map_version: int
    target: ShardMap
    request: Mapping[str, Any]
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "cluster": self.cluster,
            "base_map_version": self.base_map_version,
            "created_at": self.created_at,
            "request": dict(self.request),
            "target": self.target.to_json(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RebalancePlan":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read plan {p}: {e}") from e
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{p} is not a rebalance plan (format {PLAN_FORMAT!r})")
        try:
            return cls(str(d["cluster"]), int(d["base_map_version"]), ShardMap.from_json(d["target"]), dict(d.get("request", {})), str(d.get("created_at", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"plan {p} is malformed: {e!r}") from e


def same_map(a: ShardMap, b: ShardMap) -> bool:
    return a.to_json() == b.to_json()


# --------------------------------------------------------------------------------------------
# progress of a move
# --------------------------------------------------------------------------------------------


def required_versions(
    serving: int | None, target_version: int | None, frontends: Mapping[str, FrontendRecord], nodes: Mapping[str, NodeRecord]
) -> frozenset[int]:
    """The model versions a new owner must hold a partition at before the switch: the serving
    version, every version a live frontend serves, and the target version once some live node
    holds it (frontends may switch to it any moment) unless a node refused it."""
    out = {v for v in (serving,) if v}
    out |= {f.version for f in frontends.values() if f.version is not None}
    if target_version:
        held = any(target_version in n.versions_ready for n in nodes.values())
        refused = any(n.load_error is not None and n.load_error.version == target_version for n in nodes.values())
        if held and not refused:
            out.add(target_version)
    return frozenset(out)


@dataclass(frozen=True)
class AddState:
    """One partition a node loads for the target, and where it stands."""

    pid: PartitionId
    node_id: str
    size_bytes: int
    state: str  # "ready", "loading", "queued", "versions" (held, not at every version), "down", "error"
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class Progress:
    """How far the cluster is from serving ``target``: every add of the diff from the active
    map, and the target partitions that have a live replica holding them at ``versions``."""

    adds: tuple[AddState, ...]
    partitions_ready: int
    partitions_total: int
    not_ready: tuple[PartitionId, ...]
    versions: frozenset[int]

    @property
    def bytes_total(self) -> int:
        return sum(a.size_bytes for a in self.adds)

    @property
    def bytes_ready(self) -> int:
        return sum(a.size_bytes for a in self.adds if a.ready)

    @property
    def done(self) -> bool:
        """The switch may happen: every partition of the target has a ready live replica and
        every node that loads a partition for it has it."""
        return self.partitions_ready == self.partitions_total and all(a.ready for a in self.adds)


def progress(
    active: ShardMap,
    target: ShardMap,
    tables: Sequence[TableSpec],
    nodes: Mapping[str, NodeRecord],
    versions: frozenset[int],
) -> Progress:
    """Where the move from ``active`` to ``target`` stands, from the live nodes' znodes
    (``held``, ``versions_ready``, ``partitions_loading``, ``partition_error``)."""
    def holds(node: str, pid: PartitionId) -> bool:
        n = nodes.get(node)
        return n is not None and str(pid) in n.held and versions <= set(n.versions_ready)

    adds = []
    for m in diff(active, target, tables):
        if m.kind is not MoveKind.ADD:
            continue
        pid = PartitionId(m.table, m.partition, m.num_partitions)
        adds.append(_add_state(pid, m.node_id, m.size_bytes, nodes.get(m.node_id), versions))
    not_ready = []
    total = 0
    for pid in target.partition_ids():
        total += 1
        if not any(holds(r, pid) for r in target.replicas(pid.key)):
            not_ready.append(pid)
    return Progress(tuple(adds), total - len(not_ready), total, tuple(not_ready), versions)


def _add_state(pid: PartitionId, node: str, size: int, n: NodeRecord | None, versions: frozenset[int]) -> AddState:
    if n is None:
        return AddState(pid, node, size, "down", "no live shard process with this node id")
    if str(pid) in n.held:
        missing = sorted(versions - set(n.versions_ready))
        if missing:
            return AddState(pid, node, size, "versions", f"not yet at version(s) {missing}")
        return AddState(pid, node, size, "ready")
    err = n.partition_error
    if err is not None and err.partition == str(pid):
        return AddState(pid, node, size, "error", err.error)
    loading = n.partitions_loading
    if loading and loading[0] == str(pid):
        return AddState(pid, node, size, "loading")
    return AddState(pid, node, size, "queued")
