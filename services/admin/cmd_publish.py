"""``shardrec checkpoint publish|rollback|status``: move a live cluster between model versions.

The work is ``services.control.publish`` (docs/checkpoint.md, "Serving a new version"): only
desired state is written (``model/target_version``); nothing here waits on a process.

- ``publish VERSION``: verifies the version (every file's size and sha256, the chain to its
  base) and that a delta's parent is the version the cluster serves, then sets the target.
- ``rollback --to V``: V must be the serving version's ancestor (or the serving version); it
  becomes the target, and the next delta published must have V as its parent.
- ``status``: target and serving versions, every partition's replicas with the versions they
  hold ready, load errors the shards reported, and the version each frontend serves.

Handlers run on the CLI's main thread and import the library inside them.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from services.admin.cmd_placement import zk_args

if TYPE_CHECKING:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.discovery.cluster_store import ClusterStore


def register(sub: argparse._SubParsersAction) -> None:
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


def _with_cluster(args: argparse.Namespace, action: Callable[["ClusterStore", "CheckpointReader"], str]) -> int:
    """Print what ``action`` returns; a refusal (ShardrecError) is printed as FAILED, exit 1."""
    from services.control.cluster import open_cluster
    from services.control.publish import model_reader
    from services.core.errors import ShardrecError

    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        try:
            print(action(store, model_reader(store)))
        except ShardrecError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    from services.control.publish import publish_version

    return _with_cluster(args, lambda store, reader: publish_version(store, reader, args.version))


def _rollback(args: argparse.Namespace) -> int:
    from services.control.publish import rollback_version

    return _with_cluster(args, lambda store, reader: rollback_version(store, reader, args.version))


def _status(args: argparse.Namespace) -> int:
    from services.control.publish import format_status, read_status

    return _with_cluster(args, lambda store, _reader: format_status(read_status(store)))
