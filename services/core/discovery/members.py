"""The members watch: the live children of ``nodes/`` or ``frontends/``, each parsed into its
record (``records.py``), kept by one ChildrenWatch and one DataWatch per child. The frontend's
cluster view, the shard's frontend-version watch and the rebalance's cluster watch all use it
(docs/zookeeper.md, "Threads")."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from services.core.discovery.records import RecordError
from services.core.discovery.watches import CONNECTION_ERRORS, unavailable_when_unreachable

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger(__name__)

R = TypeVar("R")
# ``parse(data, where)``: a record from a child's znode data (``where`` names the znode in
# errors); raises RecordError when the data is malformed.
Parse = Callable[[bytes, str], R]


class MembersWatch(Generic[R]):
    """The children of ``path`` and each child's record, delivered whole to ``callback`` as
    ``{child: record}`` on every change (a child joins, leaves or rewrites its data).

    Kazoo watch callbacks only enqueue events; a private daemon thread sets the per-child data
    watches (a ZooKeeper read, never done on a kazoo callback thread), parses, and calls
    ``callback``, so calls never overlap. The callback must only hand off (record the members,
    set an event, ``loop.call_soon_threadsafe``). The first call comes once ZooKeeper answered
    and some child exists. Each child id gets one DataWatch for the process's life (a child that
    leaves and comes back is picked up by the same watch). A child whose data ``parse`` refuses
    is logged and left out, as if absent, until it writes a valid record.
    """

    def __init__(self, client: "KazooClient", path: str, parse: Parse[R], callback: Callable[[dict[str, R]], None]) -> None:
        self._client = client
        self._path = path
        self._parse = parse
        self._callback = callback
        self._events: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self._members: dict[str, R] = {}
        self._watched: set[str] = set()
        self._cancelled = False
        with unavailable_when_unreachable(f"watch {path}"):
            client.ensure_path(path)
        threading.Thread(target=self._run, name=f"members-watch {path}", daemon=True).start()
        client.ChildrenWatch(path, self._on_children)

    def cancel(self) -> None:
        self._cancelled = True
        self._events.put(("stop", None))

    # -- kazoo threads: only enqueue ------------------------------------------------------------
    def _on_children(self, children: list[str]) -> bool | None:
        if self._cancelled:
            return False
        self._events.put(("children", list(children)))
        return None

    # -- the watch's own thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, value = self._events.get()
            if kind == "stop":
                return
            if kind == "children":
                for child in value:
                    if child not in self._watched:
                        self._watched.add(child)
                        self._watch_child(child)
                continue
            child, data = value
            if self._update(child, data):
                try:
                    self._callback(dict(self._members))
                except Exception:
                    log.exception("members watch callback for %s raised", self._path)

    def _update(self, child: str, data: bytes | None) -> bool:
        """Apply one child's data (None: it left); whether the members changed."""
        record = None
        if data is not None:
            try:
                record = self._parse(data, f"{self._path}/{child}")
            except RecordError as e:
                log.warning("ignoring %s/%s: %s", self._path, child, e)
        if record is None:
            return self._members.pop(child, None) is not None
        changed = self._members.get(child) != record
        self._members[child] = record
        return changed

    def _watch_child(self, child: str) -> None:
        def on_data(data: bytes | None, stat: Any, event: Any = None) -> bool | None:
            if self._cancelled:
                return False
            self._events.put(("data", (child, None if stat is None else data)))
            return None

        try:
            self._client.DataWatch(f"{self._path}/{child}", on_data)
        except CONNECTION_ERRORS as e:  # the session comes back with the watch re-armed by kazoo
            log.warning("members watch %s: cannot watch %s yet (%r)", self._path, child, e)
            self._watched.discard(child)
