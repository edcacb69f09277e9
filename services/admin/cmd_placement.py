"""``shardrec placement init|show``: the first ShardMap of a cluster, and what is placed where.

``init`` computes the initial placement of the checkpoint's latest complete version from a spec
file and publishes it (``services.control.placement``, docs/placement.md); ``show`` prints the
active map, live nodes and versions. The library is imported inside the handlers, so
``shardrec --help`` stays light. Handlers run on the CLI's main thread.
"""

from __future__ import annotations

import argparse


def zk_args(q: argparse.ArgumentParser) -> None:
    """``--zk``, ``--cluster`` and ``--zk-auth`` as the processes declare them
    (``services.core.config.ZkConfig``), defaulting to ``$SHARDREC_ZK``, ``$SHARDREC_CLUSTER``
    and ``$SHARDREC_ZK_AUTH``."""
    from services.core.config import ZK_SETTINGS, env_default

    for name in ("zk", "cluster", "zk_auth"):
        s = ZK_SETTINGS[name]
        q.add_argument(s.flag, default=env_default(s), metavar=s.metavar, help=f"{s.help} (default ${s.env} or {s.shown(s.default)})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="initial shard map and placement inspection")
    s = p.add_subparsers(dest="placement_command", metavar="SUBCOMMAND", required=True)

    init = s.add_parser(
        "init",
        help="publish the first shard map, model pointer and versions of a cluster",
        description="Compute the initial placement of the checkpoint's latest complete version over "
        "nodes shard-0..shard-{N-1} and publish it (see docs/placement.md).",
    )
    init.add_argument("--checkpoint", required=True, help="checkpoint root URI (a path or file:///path; published as an absolute one)")
    init.add_argument("--nodes", type=int, required=True, help="number of shard nodes N")
    init.add_argument("--spec", required=True, help="placement spec file (.json or .toml), e.g. deploy/placement/mixed.json")
    init.add_argument("--version", type=int, default=None, help="model version to serve first (default: the latest complete one)")
    init.add_argument("--force", action="store_true", help="replace an existing active shard map (compare-and-set, version + 1)")
    zk_args(init)
    init.set_defaults(func=_init)

    show = s.add_parser("show", help="print the active shard map, live nodes and versions")
    zk_args(show)
    show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.placement import format_placement, init_cluster, initial_placement
    from services.core.placement import load_placement_spec

    initial = initial_placement(args.checkpoint, load_placement_spec(args.spec), args.nodes, args.version)
    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        smap, cleared = init_cluster(store, initial, force=args.force)
    if cleared:
        print("cleared the target shard map of a rebalance in progress")
    model = initial.manifest.model
    print(
        f"cluster {args.cluster!r}: shard map version {smap.version} over {len(smap.nodes)} nodes; "
        f"model {model.name!r} version {initial.manifest.version} at {initial.checkpoint}"
    )
    print(format_placement(smap, model.tables))
    return 0


def _show(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.placement import format_view, read_placement

    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        view = read_placement(store)
    print(format_view(args.cluster, view))
    return 0
