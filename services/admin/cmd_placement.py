"""``shardrec placement init|show``: the first ShardMap of a cluster, and what is placed where.

``init`` reads the model spec from the checkpoint's latest complete version, computes the
initial placement from a spec file (``services.core.placement.initial_shard_map``) and
publishes, in this order: the model pointer, the target and serving versions, then the active
ShardMap (version 1; with ``--force`` a compare-and-set to old version + 1). Shards watch the
map, so everything they need is in ZooKeeper when it appears.

kazoo and the checkpoint reader are imported inside the handlers, so ``shardrec --help`` stays
light. Handlers run on the CLI's main thread.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Sequence

from services.control.text import human_bytes, table

if TYPE_CHECKING:
    from services.core.placement import ShardMap
    from services.core.types import TableSpec


def zk_args(q: argparse.ArgumentParser) -> None:
    """``--zk`` and ``--cluster``, defaulting to ``$SHARDREC_ZK`` and ``$SHARDREC_CLUSTER``."""
    from services.core.config import default_cluster, default_zk

    q.add_argument("--zk", default=default_zk(), help="ZooKeeper hosts (default $SHARDREC_ZK or 127.0.0.1:2181)")
    q.add_argument("--cluster", default=default_cluster(), help="cluster name (default $SHARDREC_CLUSTER or 'default')")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="initial shard map and placement inspection")
    s = p.add_subparsers(dest="placement_command", metavar="SUBCOMMAND", required=True)

    init = s.add_parser(
        "init",
        help="publish the first shard map, model pointer and versions of a cluster",
        description="Compute the initial placement of the checkpoint's latest complete version over "
        "nodes shard-0..shard-{N-1} and publish it (see docs/placement.md).",
    )
    init.add_argument("--checkpoint", required=True, help="checkpoint root URI (a path or file:///path)")
    init.add_argument("--nodes", type=int, required=True, help="number of shard nodes N")
    init.add_argument("--spec", required=True, help="placement spec file (.json or .toml), e.g. deploy/placement/mixed.json")
    init.add_argument("--version", type=int, default=None, help="model version to serve first (default: the latest complete one)")
    init.add_argument("--force", action="store_true", help="replace an existing active shard map (compare-and-set, version + 1)")
    zk_args(init)
    init.set_defaults(func=_init)

    show = s.add_parser("show", help="print the active shard map, live nodes and versions")
    zk_args(show)
    show.set_defaults(func=_show)


def _connect(args: argparse.Namespace):  # noqa: ANN202
    from services.core.clients import make_kazoo
    from services.core.config import ZkConfig

    return make_kazoo(ZkConfig(hosts=args.zk, cluster=args.cluster))


def _manifest(uri: str, version: int | None):  # noqa: ANN202
    from services.core.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(uri)
    return reader.manifest(reader.latest_version() if version is None else version)


def _init(args: argparse.Namespace) -> int:
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.discovery.zk_paths import ZkPaths
    from services.core.errors import NotFoundError
    from services.core.placement import initial_shard_map, load_placement_spec, node_ids

    manifest = _manifest(args.checkpoint, args.version)
    model = manifest.model
    spec = load_placement_spec(args.spec)
    smap = initial_shard_map(spec, model.tables, node_ids(args.nodes), version=1)

    client = _connect(args)
    try:
        store = ShardMapStore(client, ZkPaths(args.cluster))
        try:
            old, old_znode_version = store.read_active()
        except NotFoundError:
            old, old_znode_version = None, None
        if old is not None:
            if not args.force:
                from services.core.errors import FailedPreconditionError

                raise FailedPreconditionError(
                    f"cluster {args.cluster!r} already has an active shard map (version {old.version}); "
                    "use --force to replace it"
                )
            smap = initial_shard_map(spec, model.tables, node_ids(args.nodes), version=old.version + 1)
        store.write_model(args.checkpoint, model.name)
        store.write_target_version(manifest.version)
        store.write_serving_version(manifest.version)
        if old is not None and store.read_target() is not None:
            store.clear_target()  # a forced map supersedes any rebalance in progress
            print("cleared the target shard map of a rebalance in progress")
        store.write_active(smap, old_znode_version)
    finally:
        client.stop()
        client.close()

    print(
        f"cluster {args.cluster!r}: shard map version {smap.version} over {len(smap.nodes)} nodes; "
        f"model {model.name!r} version {manifest.version} at {args.checkpoint}"
    )
    print(_format_placement(smap, model.tables))
    return 0


def _show(args: argparse.Namespace) -> int:
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.discovery.zk_paths import ZkPaths
    from services.core.errors import NotFoundError

    client = _connect(args)
    try:
        store = ShardMapStore(client, ZkPaths(args.cluster))
        smap, znode_version = store.read_active()
        target = store.read_target()
        live = store.live_nodes()
        frontends = store.live_frontends()
        facts: list[tuple[str, Any]] = []
        for what, read in (
            ("model", store.read_model),
            ("serving version", store.read_serving_version),
            ("target version", store.read_target_version),
        ):
            try:
                facts.append((what, read()))
            except NotFoundError:
                facts.append((what, "(none)"))
    finally:
        client.stop()
        client.close()

    print(f"cluster {args.cluster!r}: active shard map version {smap.version} (znode version {znode_version})")
    for what, value in facts:
        print(f"  {what}: {value}")
    print(f"  target shard map: {'version %d' % target[0].version if target else '(none)'}")
    print()
    print(_format_tables(smap))
    print()
    print(_format_nodes(smap, live))
    if frontends:
        print()
        print("frontends: " + ", ".join(f"{fid} ({d.get('address', '?')})" for fid, d in sorted(frontends.items())))
    return 0


# -- formatting (pure) ---------------------------------------------------------------------------


def _format_placement(smap: "ShardMap", tables: Sequence["TableSpec"]) -> str:
    """node -> partitions, bytes."""
    from services.core.placement import bytes_per_node

    sizes = bytes_per_node(smap, tables)
    rows = [("NODE", "BYTES", "", "PARTITIONS")]
    for node in smap.nodes:
        parts = " ".join(str(k) for k in smap.partitions_of(node)) or "-"
        rows.append((node, str(sizes[node]), human_bytes(sizes[node]), parts))
    return table(rows)


def _format_tables(smap: "ShardMap") -> str:
    """table -> sharding, partition -> replicas."""
    rows = [("TABLE", "SHARDING", "PARTITION", "REPLICAS")]
    for name in sorted(smap.tables):
        tp = smap.tables[name]
        for p, replicas in enumerate(tp.partitions):
            rows.append((name if p == 0 else "", tp.sharding.value if p == 0 else "", str(p), " ".join(replicas)))
    return table(rows)


def _format_nodes(smap: "ShardMap", live: dict[str, dict[str, Any]]) -> str:
    """Every node of the map and every live node: alive, address, ready versions, owned partitions."""
    rows = [("NODE", "LIVE", "ADDRESS", "READY", "SERVING", "MAP", "OWNS")]
    for node in list(smap.nodes) + sorted(set(live) - set(smap.nodes)):
        d = live.get(node)
        owns = " ".join(str(k) for k in smap.partitions_of(node)) if node in smap.nodes else "(not in map)"
        if d is None:
            rows.append((node, "no", "-", "-", "-", "-", owns))
        else:
            ready = ",".join(str(v) for v in d.get("versions_ready", [])) or "-"
            rows.append(
                (node, "yes", str(d.get("address", "?")), ready, str(d.get("serving_version", "-")), str(d.get("map_version", "-")), owns)
            )
    return table(rows)
