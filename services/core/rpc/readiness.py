"""Readiness: the named conditions a process must meet to take traffic (docs/health.md).

A process declares its conditions once (a shard: ``loaded``; a frontend: ``loaded``,
``cluster_view``, ...) and each owner sets its own. The process is ready when every condition
holds; the gRPC server (``services.core.rpc.server``) follows it: its serving services are
SERVING exactly while ready. Liveness is not here: it is only that the process answers.

Pure module (no grpc): thread-safe, any thread may ``set``; ``on_change`` is called with the
new readiness under the lock, in the order the changes happened, so it must only hand off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class Readiness:
    """Conditions by name, each holding or not (with why not). None holds at first."""

    def __init__(self, conditions: Iterable[str]) -> None:
        self._why: dict[str, str | None] = {name: "not yet" for name in conditions}  # None: holds
        if not self._why:
            raise ValueError("readiness needs at least one condition")
        self._lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def conditions(self) -> tuple[str, ...]:
        return tuple(self._why)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready()

    def failing(self) -> dict[str, str]:
        """Each condition that does not hold, and why."""
        with self._lock:
            return {name: why for name, why in self._why.items() if why is not None}

    def subscribe(self, on_change: Callable[[bool], None]) -> None:
        """Call ``on_change(ready)`` now and on every change of readiness."""
        with self._lock:
            self._listeners.append(on_change)
            on_change(self._ready())

    def set(self, name: str, holds: bool, why: str = "") -> None:
        """Condition ``name`` holds (or not, because ``why``). An unknown name is a bug: KeyError."""
        if name not in self._why:
            raise KeyError(f"unknown readiness condition {name!r} (known: {', '.join(self._why)})")
        with self._lock:
            before = self._ready()
            was = self._why[name]
            self._why[name] = None if holds else (why or "does not hold")
            if (was is None) != holds:
                log.info("readiness condition %s %s", name, "holds" if holds else f"fails: {self._why[name]}")
            after = self._ready()
            if after != before:
                if after:
                    log.info("ready: every condition holds (%s)", ", ".join(self._why))
                else:
                    log.warning("NOT ready: %s", "; ".join(f"{n}: {w}" for n, w in self._why.items() if w is not None))
                for listener in self._listeners:
                    listener(after)

    def _ready(self) -> bool:
        return all(why is None for why in self._why.values())
