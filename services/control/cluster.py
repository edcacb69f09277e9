"""A connection to one cluster's ZooKeeper namespace for the duration of a command."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

if TYPE_CHECKING:
    from kazoo.client import KazooClient

    from services.core.discovery.cluster_store import ClusterStore

T = TypeVar("T")


@contextmanager
def open_cluster(
    zk_hosts: str, cluster: str, *, session_timeout_s: float | None = None, connect_timeout_s: float | None = None,
    auth_file: str = "",
) -> Iterator[tuple["KazooClient", "ClusterStore"]]:
    """A started kazoo client (``core.clients.make_kazoo``) and the cluster's store; both closed
    at exit. Timeouts default to ``ZkConfig``'s; the store's reads wait ``connect_timeout_s``
    when it is given; ``auth_file``: the ZooKeeper credentials (``--zk-auth``). UnavailableError
    when ZooKeeper does not answer."""
    from services.core.clients import make_kazoo
    from services.core.config import ZkConfig, load_zk_auth
    from services.core.discovery.cluster_store import ClusterStore
    from services.core.discovery.zk_paths import ZkPaths

    timeouts: dict[str, float] = {}
    if session_timeout_s is not None:
        timeouts["session_timeout_s"] = session_timeout_s
    if connect_timeout_s is not None:
        timeouts["connect_timeout_s"] = connect_timeout_s
    client = make_kazoo(ZkConfig(hosts=zk_hosts, cluster=cluster, auth=load_zk_auth(auth_file), **timeouts))
    try:
        reads = {} if connect_timeout_s is None else {"timeout_s": connect_timeout_s}
        yield client, ClusterStore(client, ZkPaths(cluster), **reads)
    finally:
        client.stop()
        client.close()


def maybe(read: Callable[[], T]) -> T | None:
    """``read()``, or None when what it reads does not exist (NotFoundError)."""
    from services.core.errors import NotFoundError

    try:
        return read()
    except NotFoundError:
        return None

