"""The cluster's coordination state in ZooKeeper: shard maps, model pointer, versions, members.

``ClusterStore`` reads and writes the persistent znodes of one cluster (paths from ZkPaths,
their JSON through ``records.py``, see docs/zookeeper.md) and reads or watches its members.
Shard maps are written with compare-and-set on the znode version, so two writers (two
rebalances, a rebalance and an operator) can never both win: the loser gets
FailedPreconditionError and must re-read.

Threads: every method except the watch callbacks blocks on ZooKeeper round trips; call them
from any thread but a kazoo callback thread (in asyncio code: from an executor). Watch
callbacks run on a kazoo thread and must only hand off (``loop.call_soon_threadsafe``).

Deadlines: while the connection is down, kazoo queues requests until it reconnects. Every call
here waits at most ``timeout_s`` and then raises UnavailableError; a write that timed out may
still be applied when the connection returns, so re-read before retrying (the compare-and-set
on shard maps makes that safe).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError, RolledBackError

from services.core.discovery.members import MembersWatch, Parse
from services.core.discovery.records import FrontendRecord, ModelPointer, NodeRecord, RecordError, VersionRecord
from services.core.discovery.watches import ZnodeWatch, unavailable_when_unreachable, watch_znode
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from services.core.placement import ShardMap

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger(__name__)

ShardMapCallback = Callable[["ShardMap | None"], None]
R = TypeVar("R")


class ClusterStore:
    """Reads and writes one cluster's persistent coordination znodes over an injected client.

    The client is owned by the caller (``services.core.clients.make_kazoo``). Thread-safe: it
    holds no state beyond the client and the paths.
    """

    def __init__(self, client: "KazooClient", paths: ZkPaths, *, timeout_s: float = 10.0) -> None:
        self._client = client
        self._paths = paths
        self._timeout_s = timeout_s

    @property
    def paths(self) -> ZkPaths:
        return self._paths

    # -- shard maps ---------------------------------------------------------------------------
    def read_active(self) -> tuple[ShardMap, int]:
        """The active ShardMap and its znode version. NotFoundError if none was written."""
        found = self._read_map(self._paths.shardmap_active, "active")
        if found is None:
            raise NotFoundError(
                f"cluster {self._paths.cluster!r} has no active shard map ({self._paths.shardmap_active}); "
                "run `shardrec placement init`"
            )
        return found

    def write_active(self, smap: ShardMap, expected_znode_version: int | None) -> int:
        """Compare-and-set the active map; returns the new znode version.

        ``expected_znode_version`` is the znode version read with the map being replaced, or
        None to create the first map. Raises FailedPreconditionError when the znode changed
        (or exists, or vanished) since then: re-read and decide again.
        """
        return self._write_map(self._paths.shardmap_active, "active", smap, expected_znode_version)

    def read_target(self) -> tuple[ShardMap, int] | None:
        """The target ShardMap of a rebalance in progress and its znode version, or None."""
        return self._read_map(self._paths.shardmap_target, "target")

    def write_target(self, smap: ShardMap, expected_znode_version: int | None) -> int:
        """Compare-and-set the target map (same contract as ``write_active``)."""
        return self._write_map(self._paths.shardmap_target, "target", smap, expected_znode_version)

    def clear_target(self, expected_znode_version: int | None = None) -> None:
        """Delete the target map (rebalance finished or aborted). Idempotent when absent.

        With ``expected_znode_version``, raise FailedPreconditionError if it changed since.
        """
        path = self._paths.shardmap_target
        what = f"clear target shard map of {self._paths.cluster!r}"
        with unavailable_when_unreachable(what):
            try:
                self._wait(
                    what,
                    self._client.delete_async(path, version=-1 if expected_znode_version is None else expected_znode_version),
                    write=True,
                )
            except NoNodeError:
                pass
            except BadVersionError as e:
                raise FailedPreconditionError(
                    f"target shard map changed since znode version {expected_znode_version}"
                ) from e

    def promote_target(self, target: ShardMap, expected_active: int, expected_target: int) -> int:
        """Make ``target`` the active map and delete the target znode, in ONE ZooKeeper
        transaction: both happen or neither. Only if the active znode is still at
        ``expected_active`` and the target at ``expected_target`` (compare-and-set on both);
        else FailedPreconditionError naming which changed. Returns the active znode's new
        version. A rebalance ends with this, so a crash never leaves a half switch."""
        target.validate()
        what = f"switch the active shard map of {self._paths.cluster!r} to version {target.version}"
        tx = self._client.transaction()
        tx.set_data(self._paths.shardmap_active, target.to_bytes(), version=expected_active)
        tx.delete(self._paths.shardmap_target, version=expected_target)
        with unavailable_when_unreachable(what):
            results = self._wait(what, tx.commit_async(), write=True)
        failed = [(name, r) for name, r in zip(("active", "target"), results) if isinstance(r, Exception)]
        real = [(name, r) for name, r in failed if not isinstance(r, RolledBackError)]
        if real:
            name, err = real[0]
            expected = expected_active if name == "active" else expected_target
            raise FailedPreconditionError(
                f"{what}: the {name} shard map changed since znode version {expected} ({type(err).__name__}); re-read"
            ) from err
        if failed:
            raise FailedPreconditionError(f"{what}: the transaction was rolled back ({failed[0][1]!r}); re-read")
        return results[0].version

    def watch_active(self, callback: ShardMapCallback) -> ZnodeWatch:
        """Call ``callback(ShardMap | None)`` now and after every change of the active map.

        The first call happens in the calling thread, before this returns; later calls run on
        a kazoo thread and must only hand off (e.g. ``loop.call_soon_threadsafe``), never block
        or call ZooKeeper. None means the znode does not exist. A malformed map is logged and
        not delivered (the caller keeps its last good map). Calls for one watch never overlap,
        and the watch survives session losses (kazoo re-reads on reconnection). Setting the
        watch blocks until ZooKeeper answers the first read (no ``timeout_s`` here).
        """
        return self._watch_map(self._paths.shardmap_active, callback)

    def watch_target(self, callback: ShardMapCallback) -> ZnodeWatch:
        """Same as ``watch_active`` for the target map (None: no rebalance in progress)."""
        return self._watch_map(self._paths.shardmap_target, callback)

    # -- model pointer and versions -----------------------------------------------------------
    def read_model(self) -> ModelPointer:
        """Where shards and frontends read checkpoint versions from. NotFoundError if never
        written."""
        path = self._paths.model_checkpoint
        return ModelPointer.from_bytes(self._read(path, "model checkpoint"), f"znode {path}")

    def write_model(self, uri: str, name: str) -> None:
        if not uri:
            raise InvalidArgumentError("model checkpoint uri must be non-empty")
        self._put(self._paths.model_checkpoint, ModelPointer(uri, name).to_bytes())

    def read_serving_version(self) -> int:
        """The model version frontends serve. NotFoundError if never written."""
        return self._read_version(self._paths.serving_version, "serving version")

    def write_serving_version(self, version: int) -> None:
        self._put(self._paths.serving_version, VersionRecord(self._check_version(version)).to_bytes())

    def read_target_version(self) -> int:
        """The model version shards should load next. NotFoundError if never written."""
        return self._read_version(self._paths.target_version, "target version")

    def write_target_version(self, version: int) -> None:
        self._put(self._paths.target_version, VersionRecord(self._check_version(version)).to_bytes())

    def watch_serving_version(self, callback: Callable[[int | None], None]) -> ZnodeWatch:
        """Call ``callback(version | None)`` now and after every change of the serving version
        (same threading rules as ``watch_active``; a malformed value is logged, not delivered)."""
        return self._watch_version(self._paths.serving_version, callback)

    def watch_target_version(self, callback: Callable[[int | None], None]) -> ZnodeWatch:
        """Same as ``watch_serving_version`` for the target version."""
        return self._watch_version(self._paths.target_version, callback)

    def _watch_version(self, path: str, callback: Callable[[int | None], None]) -> ZnodeWatch:
        return self._watch(path, lambda data: VersionRecord.from_bytes(data, f"znode {path}").version, callback)

    # -- membership ---------------------------------------------------------------------------
    def ensure_members(self) -> None:
        """Create the parents of the members' znodes (``nodes``, ``frontends``) if missing."""
        for path in (self._paths.nodes, self._paths.frontends):
            with unavailable_when_unreachable(f"create {path}"):
                self._wait(f"create {path}", self._client.ensure_path_async(path), write=True)

    def live_nodes(self) -> dict[str, NodeRecord]:
        """Every registered shard node: node id -> its record (a malformed one is skipped)."""
        return self._live_children(self._paths.nodes, NodeRecord.from_bytes)

    def live_frontends(self) -> dict[str, FrontendRecord]:
        """Every registered frontend: frontend id -> its record (a malformed one is skipped)."""
        return self._live_children(self._paths.frontends, FrontendRecord.from_bytes)

    def watch_nodes(self, callback: Callable[[dict[str, NodeRecord]], None], *, dialable: bool = False) -> MembersWatch[NodeRecord]:
        """Call ``callback({node_id: record})`` whenever a shard node joins, leaves or rewrites
        its znode (``members.MembersWatch``: from the watch's own thread, never overlapping;
        the callback only hands off). ``dialable``: a node whose znode names no address is
        left out, like a malformed one."""
        return MembersWatch(self._client, self._paths.nodes, partial(NodeRecord.from_bytes, dialable=dialable), callback)

    def watch_frontends(self, callback: Callable[[dict[str, FrontendRecord]], None]) -> MembersWatch[FrontendRecord]:
        """Same as ``watch_nodes`` for the live frontends."""
        return MembersWatch(self._client, self._paths.frontends, FrontendRecord.from_bytes, callback)

    # -- internals ----------------------------------------------------------------------------
    def _wait(self, what: str, result: Any, *, write: bool = False) -> Any:
        """The value of a kazoo async result, waiting at most ``timeout_s``."""
        try:
            return result.get(timeout=self._timeout_s)
        except self._client.handler.timeout_exception as e:
            hint = "; the write may still be applied when the connection returns: re-read before retrying" if write else ""
            raise UnavailableError(
                f"{what}: no answer from ZooKeeper within {self._timeout_s:g}s (connection {self._client.state}){hint}"
            ) from e

    def _read_map(self, path: str, which: str) -> tuple[ShardMap, int] | None:
        what = f"read {which} shard map of {self._paths.cluster!r}"
        with unavailable_when_unreachable(what):
            try:
                data, stat = self._wait(what, self._client.get_async(path))
            except NoNodeError:
                return None
        return ShardMap.from_bytes(data), stat.version

    def _write_map(self, path: str, which: str, smap: ShardMap, expected: int | None) -> int:
        smap.validate()
        payload = smap.to_bytes()
        what = f"write {which} shard map of {self._paths.cluster!r}"
        with unavailable_when_unreachable(what):
            if expected is None:
                try:
                    self._wait(what, self._client.create_async(path, payload, makepath=True), write=True)
                except NodeExistsError as e:
                    raise FailedPreconditionError(
                        f"{which} shard map changed since version none: it already exists "
                        f"(writing map version {smap.version})"
                    ) from e
                return 0
            try:
                stat = self._wait(what, self._client.set_async(path, payload, version=expected), write=True)
            except BadVersionError as e:
                raise FailedPreconditionError(
                    f"{which} shard map changed since version {expected} (writing map version {smap.version})"
                ) from e
            except NoNodeError as e:
                raise FailedPreconditionError(
                    f"{which} shard map changed since version {expected}: it was deleted"
                ) from e
        return stat.version

    def _watch_map(self, path: str, callback: ShardMapCallback) -> ZnodeWatch:
        return self._watch(path, lambda data: ShardMap.from_bytes(data or b""), callback)

    def _watch(self, path: str, parse: Callable[[bytes], Any], callback: Callable[[Any], None]) -> ZnodeWatch:
        return watch_znode(self._client, path, parse, callback)

    def _read(self, path: str, what: str) -> bytes:
        with unavailable_when_unreachable(f"read {what} of {self._paths.cluster!r}"):
            try:
                data, _stat = self._wait(f"read {what}", self._client.get_async(path))
            except NoNodeError as e:
                raise NotFoundError(f"cluster {self._paths.cluster!r} has no {what} ({path})") from e
        return data or b""

    def _read_version(self, path: str, what: str) -> int:
        return VersionRecord.from_bytes(self._read(path, what), f"znode {path}").version

    @staticmethod
    def _check_version(version: int) -> int:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidArgumentError(f"a model version must be an integer >= 1, got {version!r}")
        return version

    def _put(self, path: str, payload: bytes) -> None:
        """Set or create (with parents) a persistent znode, last writer wins."""
        what = f"write {path}"
        with unavailable_when_unreachable(what):
            while True:
                try:
                    self._wait(what, self._client.set_async(path, payload), write=True)
                    return
                except NoNodeError:
                    pass
                try:
                    self._wait(what, self._client.create_async(path, payload, makepath=True), write=True)
                    return
                except NodeExistsError:
                    continue  # created in between: set it

    def _live_children(self, parent: str, parse: Parse[R]) -> dict[str, R]:
        what = f"list {parent}"
        with unavailable_when_unreachable(what):
            try:
                children = self._wait(what, self._client.get_children_async(parent))
            except NoNodeError:
                return {}
            pending = [(name, self._client.get_async(f"{parent}/{name}")) for name in sorted(children)]
            out: dict[str, R] = {}
            for name, result in pending:
                try:
                    data, _stat = self._wait(what, result)
                except NoNodeError:
                    continue  # left in between
                try:
                    out[name] = parse(data or b"", f"{parent}/{name}")
                except RecordError as e:
                    log.warning("skipping %s/%s: %s", parent, name, e)
        return out

