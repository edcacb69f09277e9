"""Watching one znode, and the kazoo errors that mean "ZooKeeper is unreachable right now".

``watch_znode`` is the DataWatch recipe the cluster store's watches (shard maps, versions) are
built on: a callback with the parsed value now and after every change, a malformed value
logged and not delivered. Threads as docs/zookeeper.md ("Threads") says: callbacks run on a
kazoo thread and only hand off.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kazoo.exceptions import ConnectionLoss, OperationTimeoutError, SessionExpiredError

from services.core.errors import ConfigError, UnavailableError

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger(__name__)

# Kazoo errors that mean "ZooKeeper is not reachable right now", not "the request was wrong".
CONNECTION_ERRORS = (ConnectionLoss, SessionExpiredError, OperationTimeoutError)


@contextmanager
def unavailable_when_unreachable(what: str) -> Iterator[None]:
    """Turn "ZooKeeper unreachable" kazoo errors into UnavailableError naming the operation."""
    try:
        yield
    except CONNECTION_ERRORS as e:
        raise UnavailableError(f"{what}: ZooKeeper unreachable ({e!r})") from e


class ZnodeWatch:
    """Handle of a znode watch. ``cancel()`` stops callbacks; kazoo drops the underlying watch
    at the next change of the znode. Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def watch_znode(client: "KazooClient", path: str, parse: Callable[[bytes], Any], callback: Callable[[Any], None]) -> ZnodeWatch:
    """DataWatch ``path``: ``callback(parse(data))``, or ``callback(None)`` when the znode does
    not exist; a value ``parse`` refuses (ConfigError) is logged and not delivered.

    The first call happens in the calling thread, before this returns (setting the watch
    blocks until ZooKeeper answers the first read); later calls run on a kazoo thread, never
    overlap, and survive session losses (kazoo re-reads on reconnection)."""
    watch = ZnodeWatch(path)

    def on_data(data: bytes | None, stat: Any, event: Any = None) -> bool | None:
        # Kazoo thread (the caller's thread for the first call). Never raises: kazoo would
        # retry a TypeError with fewer arguments.
        if watch.cancelled:
            return False  # tells kazoo to drop the watch
        try:
            value = None if stat is None else parse(data or b"")
        except ConfigError as e:
            log.error("ignoring malformed value at %s: %s", path, e)
            return None
        try:
            callback(value)
        except Exception:
            log.exception("watch callback for %s raised", path)
        return None

    with unavailable_when_unreachable(f"watch {path}"):
        client.DataWatch(path, on_data)
    return watch
