"""A cluster's first shard map (``shardrec placement init``) and what is placed where
(``placement show``); docs/placement.md ("Initial placement") tells the rules.

``init_cluster`` publishes, in this order: the model pointer, the target and serving versions,
then the active ShardMap (version 1; with ``force`` a compare-and-set to old version + 1).
Shards watch the map, so everything they need is in ZooKeeper when it appears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from services.control.cluster import maybe
from services.control.text import human_bytes, node_cells, table

if TYPE_CHECKING:
    from services.core.checkpoint.manifest import Manifest
    from services.core.discovery.cluster_store import ClusterStore
    from services.core.discovery.records import FrontendRecord, NodeRecord
    from services.core.placement import PlacementSpec, ShardMap
    from services.core.types import TableSpec


@dataclass(frozen=True)
class InitialPlacement:
    """The first placement of a checkpoint's model version over ``nodes`` nodes; ``checkpoint``
    is an absolute URI (``initial_placement`` makes it one)."""

    checkpoint: str
    manifest: "Manifest"
    spec: "PlacementSpec"
    nodes: int

    def shard_map(self, version: int = 1) -> "ShardMap":
        from services.core.placement import initial_shard_map, node_ids

        return initial_shard_map(self.spec, self.manifest.model.tables, node_ids(self.nodes), version=version)


def initial_placement(checkpoint: str, spec: "PlacementSpec", nodes: int, version: int | None = None) -> InitialPlacement:
    """Read the model of ``checkpoint``'s ``version`` (default: the latest complete one) and
    check that ``spec`` places it on ``nodes`` nodes (ConfigError if not). No ZooKeeper. The
    placement names the checkpoint by its absolute URI (``absolute_uri``): that is what the
    model pointer publishes, for shards started in any directory."""
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.storage import absolute_uri

    checkpoint = absolute_uri(checkpoint)
    reader = CheckpointReader(checkpoint)
    manifest = reader.manifest(reader.latest_version() if version is None else version)
    initial = InitialPlacement(checkpoint, manifest, spec, nodes)
    initial.shard_map()
    return initial


def planned_spec(tables: Sequence["TableSpec"], nodes: int) -> "PlacementSpec":
    """The placement spec the planner chooses for ``tables`` on ``nodes`` nodes when nobody
    wrote one (``shardrec cluster up --checkpoint`` without ``--spec``): ``plan`` with no load
    measured yet and the defaults of ``rebalance plan`` (nodes of 64 GiB, tables up to 1 MiB
    replicated), each table's shape then pinned as the plan left it (docs/placement.md,
    "Initial placement"). Pure."""
    from services.control.rebalance import DEFAULT_NODE_MEMORY_BYTES, DEFAULT_REPLICATE_MAX_BYTES
    from services.core.placement import NodeCapacity, PlacementSpec, PlannerConfig, TableLoad, node_ids, plan
    from services.core.rebalance import kept_shape

    smap = plan(
        [TableLoad(t, 0.0) for t in tables],
        [NodeCapacity(n, DEFAULT_NODE_MEMORY_BYTES) for n in node_ids(nodes)],
        None,
        PlannerConfig(replicate_max_bytes=DEFAULT_REPLICATE_MAX_BYTES),
        version=1,
    )
    return PlacementSpec(tables={name: kept_shape(smap, name, nodes) for name in sorted(smap.tables)})


def init_cluster(store: "ClusterStore", initial: InitialPlacement, *, force: bool = False) -> tuple["ShardMap", bool]:
    """Publish ``initial``: the model pointer, the target and serving versions, then the active
    map. FailedPreconditionError when the cluster has an active map already, unless ``force``
    (then the map replaces it, version + 1, and any rebalance in progress is given up).
    Returns the map written and whether a rebalance's target map was cleared."""
    from services.core.errors import FailedPreconditionError

    found = maybe(store.read_active)
    old, old_znode_version = found if found is not None else (None, None)
    smap = initial.shard_map()
    if old is not None:
        if not force:
            raise FailedPreconditionError(
                f"cluster {store.paths.cluster!r} already has an active shard map (version {old.version}); "
                "use --force to replace it"
            )
        smap = initial.shard_map(version=old.version + 1)
    store.ensure_members()  # made by the admin: with ACLs, shards and frontends may only add children
    store.write_model(initial.checkpoint, initial.manifest.model.name)
    store.write_target_version(initial.manifest.version)
    store.write_serving_version(initial.manifest.version)
    cleared = False
    if old is not None and store.read_target() is not None:
        store.clear_target()  # a forced map supersedes any rebalance in progress
        cleared = True
    store.write_active(smap, old_znode_version)
    return smap, cleared


@dataclass(frozen=True)
class PlacementView:
    """What ``placement show`` prints: the active map and its znode version, the facts of the
    model pointer and versions (None when not written), the target map, live members."""

    active: "ShardMap"
    znode_version: int
    facts: tuple[tuple[str, Any], ...]
    target: "ShardMap | None"
    nodes: Mapping[str, "NodeRecord"]
    frontends: Mapping[str, "FrontendRecord"]


def read_placement(store: "ClusterStore") -> PlacementView:
    """NotFoundError when the cluster has no active shard map."""
    smap, znode_version = store.read_active()
    target = store.read_target()
    nodes = store.live_nodes()
    frontends = store.live_frontends()
    facts = tuple(
        (what, maybe(read))
        for what, read in (
            ("model", lambda: store.read_model().to_dict()),
            ("serving version", store.read_serving_version),
            ("target version", store.read_target_version),
        )
    )
    return PlacementView(smap, znode_version, facts, None if target is None else target[0], nodes, frontends)


def format_view(cluster: str, view: PlacementView) -> str:
    """The report of ``placement show``. Pure."""
    smap = view.active
    lines = [f"cluster {cluster!r}: active shard map version {smap.version} (znode version {view.znode_version})"]
    lines += [f"  {what}: {'(none)' if value is None else value}" for what, value in view.facts]
    lines.append(f"  target shard map: {'version %d' % view.target.version if view.target else '(none)'}")
    lines += ["", format_tables(smap), "", format_nodes(smap, view.nodes)]
    if view.frontends:
        lines += ["", "frontends: " + ", ".join(f"{fid} ({f.address or '?'})" for fid, f in sorted(view.frontends.items()))]
    return "\n".join(lines)


def format_placement(smap: "ShardMap", tables: Sequence["TableSpec"]) -> str:
    """node -> partitions, bytes."""
    from services.core.placement import bytes_per_node

    sizes = bytes_per_node(smap, tables)
    rows = [("NODE", "BYTES", "", "PARTITIONS")]
    for node in smap.nodes:
        parts = " ".join(str(k) for k in smap.partitions_of(node)) or "-"
        rows.append((node, str(sizes[node]), human_bytes(sizes[node]), parts))
    return table(rows)


def format_tables(smap: "ShardMap") -> str:
    """table -> sharding, partition -> replicas."""
    rows = [("TABLE", "SHARDING", "PARTITION", "REPLICAS")]
    for name in sorted(smap.tables):
        tp = smap.tables[name]
        for p, replicas in enumerate(tp.partitions):
            rows.append((name if p == 0 else "", tp.sharding.value if p == 0 else "", str(p), " ".join(replicas)))
    return table(rows)


def format_nodes(smap: "ShardMap", live: Mapping[str, "NodeRecord"]) -> str:
    """Every node of the map and every live node: alive, address, ready versions, owned partitions."""
    rows = [("NODE", "LIVE", "ADDRESS", "READY", "SERVING", "MAP", "OWNS")]
    for node in list(smap.nodes) + sorted(set(live) - set(smap.nodes)):
        d = live.get(node)
        owns = " ".join(str(k) for k in smap.partitions_of(node)) if node in smap.nodes else "(not in map)"
        if d is None:
            rows.append((node, "no", "-", "-", "-", "-", owns))
        else:
            rows.append((node, "yes", *node_cells(d), owns))
    return table(rows)
