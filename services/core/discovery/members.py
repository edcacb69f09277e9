"""Members of a cluster: the children of ``nodes/`` or ``frontends/``, each with its znode's
data, kept by one ChildrenWatch and one DataWatch per child (docs/zookeeper.md, "Threads")."""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

from services.core.discovery.watches import CONNECTION_ERRORS, unavailable_when_unreachable
from services.core.errors import ConfigError

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger(__name__)


def _load(path: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise ConfigError(f"znode {path} does not hold valid JSON: {e}") from e


class MembersWatch:
    """The children of ``path`` and each child's JSON, delivered whole to ``callback`` on every
    change (a child joins, leaves or rewrites its data).

    Kazoo watch callbacks only enqueue events; a private daemon thread sets the per-child data
    watches (a ZooKeeper read, never done on a kazoo callback thread) and calls ``callback``,
    so calls never overlap. Each child id gets one DataWatch for the process's life (a child
    that leaves and comes back is picked up by the same watch).
    """

    def __init__(self, client: "KazooClient", path: str, callback: Callable[[dict[str, dict[str, Any]]], None]) -> None:
        self._client = client
        self._path = path
        self._callback = callback
        self._events: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self._members: dict[str, dict[str, Any]] = {}
        self._watched: set[str] = set()
        self._cancelled = False
        with unavailable_when_unreachable(f"watch {path}"):
            client.ensure_path(path)
        threading.Thread(target=self._run, name=f"members-watch {path}", daemon=True).start()
        client.ChildrenWatch(path, self._on_children)

    def cancel(self) -> None:
        self._cancelled = True
        self._events.put(("stop", None))

    def _on_children(self, children: list[str]) -> bool | None:
        if self._cancelled:
            return False
        self._events.put(("children", list(children)))
        return None

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
            if data is None:
                changed = self._members.pop(child, None) is not None
            else:
                try:
                    parsed = _load(f"{self._path}/{child}", data)
                except ConfigError as e:
                    log.warning("ignoring %s/%s: %s", self._path, child, e)
                    continue
                changed = self._members.get(child) != parsed
                self._members[child] = parsed if isinstance(parsed, dict) else {"value": parsed}
            if changed:
                try:
                    self._callback(dict(self._members))
                except Exception:
                    log.exception("members watch callback for %s raised", self._path)

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
