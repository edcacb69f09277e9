"""``shardrec checkpoint publish|rollback|status``: move a live cluster between model versions.

The CLI only publishes desired state (``model/target_version``); shards load the target in the
background and report it ready, and each frontend switches when every partition has a ready
replica (docs/checkpoint.md, "Serving a new version"). Nothing here waits on a process.

- ``publish VERSION``: verifies the version (every file's size and sha256, the chain to its
  base) and that a delta's parent is the version the cluster serves, then sets the target.
- ``rollback --to V``: V must be the serving version's ancestor (or the serving version); it
  becomes the target, and the next delta published must have V as its parent.
- ``status``: target and serving versions, every partition's replicas with the versions they
  hold ready, load errors the shards reported, and the version each frontend serves.

Handlers run on the CLI's main thread; kazoo and the reader are imported inside them.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.discovery.shard_map_store import ShardMapStore


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import default_cluster, default_zk

    def zk_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--zk", default=default_zk(), help="ZooKeeper hosts (default $SHARDREC_ZK or 127.0.0.1:2181)")
        q.add_argument("--cluster", default=default_cluster(), help="cluster name (default $SHARDREC_CLUSTER or 'default')")

    publish = sub.add_parser("publish", help="verify a version and make it the cluster's target (shards load it live)")
    publish.add_argument("version", type=int, help="the version to serve next: a delta of the serving version, or a base")
    zk_args(publish)
    publish.set_defaults(func=_publish)
    rollback = sub.add_parser("rollback", help="make an earlier version (an ancestor of the serving one) the target again")
    rollback.add_argument("--to", dest="version", type=int, required=True, help="the version to go back to")
    zk_args(rollback)
    rollback.set_defaults(func=_rollback)
    status = sub.add_parser("status", help="target and serving versions, readiness per partition, load errors")
    zk_args(status)
    status.set_defaults(func=_status)


def publish_version(store: "ShardMapStore", reader: "CheckpointReader", version: int) -> str:
    """Verify ``version`` and set it as the target. FailedPreconditionError when it is a delta
    whose parent is not the serving version; CheckpointError when it is incomplete or corrupt.
    Returns a line saying what was published."""
    from services.core.checkpoint.manifest import KIND_DELTA
    from services.core.errors import FailedPreconditionError

    serving = store.read_serving_version()
    for m in reader.chain(version):
        reader.verify(m.version, full=m.version == version)
    m = reader.manifest(version)
    if m.kind == KIND_DELTA and m.parent != serving:
        raise FailedPreconditionError(
            f"version {version} is a delta of version {m.parent}, but the cluster serves version {serving}: "
            f"publish a delta whose parent is {serving}"
        )
    store.write_target_version(version)
    return f"published version {version} ({m.kind}, parent {m.parent}); the cluster serves {serving} until every partition is ready"


def rollback_version(store: "ShardMapStore", reader: "CheckpointReader", version: int) -> str:
    """Make ``version``, an ancestor of the serving version, the target again."""
    from services.core.errors import FailedPreconditionError

    serving = store.read_serving_version()
    chain = [m.version for m in reader.chain(serving)]
    if version not in chain:
        raise FailedPreconditionError(
            f"version {version} is not an ancestor of the serving version {serving} (its chain is {chain}); "
            f"publish it instead if it is a delta of {serving}"
        )
    reader.verify(version, full=True)
    store.write_target_version(version)
    return f"rolling back from version {serving} to {version}; the next delta must have parent {version}"


def _with_cluster(args: argparse.Namespace, action) -> int:  # noqa: ANN001
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_kazoo
    from services.core.config import ZkConfig
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.discovery.zk_paths import ZkPaths
    from services.core.errors import ShardrecError

    client = make_kazoo(ZkConfig(hosts=args.zk, cluster=args.cluster))
    try:
        store = ShardMapStore(client, ZkPaths(args.cluster))
        reader = CheckpointReader(store.read_model()["uri"])
        print(action(store, reader))
    except ShardrecError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        client.stop()
        client.close()
    return 0


def _publish(args: argparse.Namespace) -> int:
    return _with_cluster(args, lambda store, reader: publish_version(store, reader, args.version))


def _rollback(args: argparse.Namespace) -> int:
    return _with_cluster(args, lambda store, reader: rollback_version(store, reader, args.version))


def _status(args: argparse.Namespace) -> int:
    return _with_cluster(args, lambda store, reader: format_status(read_status(store)))


def read_status(store: "ShardMapStore") -> dict[str, Any]:
    from services.core.errors import NotFoundError

    def maybe(read):  # noqa: ANN001, ANN202
        try:
            return read()
        except NotFoundError:
            return None

    smap, _ = store.read_active()
    return {
        "target": maybe(store.read_target_version),
        "serving": maybe(store.read_serving_version),
        "map": smap,
        "nodes": store.live_nodes(),
        "frontends": store.live_frontends(),
    }


def format_status(st: dict[str, Any]) -> str:
    """Pure: the status report printed by ``checkpoint status``."""
    target, smap, nodes = st["target"], st["map"], st["nodes"]
    lines = [f"target version {target}, serving version {st['serving']}"]
    rows = [("TABLE", "PARTITION", "READY AT TARGET", "REPLICAS (versions ready)")]
    for name in sorted(smap.tables):
        for p, replicas in enumerate(smap.tables[name].partitions):
            cells, ready = [], 0
            for r in replicas:
                d = nodes.get(r)
                versions = d.get("versions_ready", []) if d else []
                ready += target in versions
                cells.append(f"{r}[{','.join(map(str, versions))}]" if d else f"{r}[down]")
            rows.append((name, str(p), f"{ready}/{len(replicas)}", " ".join(cells)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for node, d in sorted(nodes.items()):
        if d.get("loading"):
            lines.append(f"{node}: loading version {d['loading']}")
        err = d.get("load_error")
        if err:
            lines.append(f"{node}: REFUSED version {err.get('version')}: {err.get('error')}")
    for fid, d in sorted(st["frontends"].items()):
        lines.append(f"frontend {fid}: serving version {d.get('version')}")
    return "\n".join(lines)
