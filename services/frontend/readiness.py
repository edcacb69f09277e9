"""The frontend's readiness (docs/health.md): the conditions it must meet to take traffic.

``loaded`` (model and server up), ``cluster_view`` (kept here, over the ZooKeeper-fed view) and
``feature_store`` (set from the feature store's state, ``main._publish_health``: OK, or the
operator chose defaults on loss). ``cluster_view`` holds while every
partition of the active shard map has a replica ready at the version served, in the view or
gone from it less than ``grace_s`` ago: a ZooKeeper outage changes nothing (no watch fires), and
the departures that follow one (sessions expiring once it resumes, re-established within a
session timeout or two) do not flip readiness either. Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.core.rpc.readiness import Readiness
from services.frontend.view import ClusterView

LOADED = "loaded"
CLUSTER_VIEW = "cluster_view"
FEATURE_STORE = "feature_store"


def view_grace_s(session_timeout_s: float) -> float:
    """How long a node that left the view still counts as a ready replica."""
    return max(2.0, 2.0 * session_timeout_s)


class ViewReadiness:
    """Sets ``readiness``'s ``cluster_view`` from ``view`` at ``version_of()`` on every change of
    the view and when the grace of a departed node ends."""

    def __init__(self, view: ClusterView, readiness: Readiness, version_of: Callable[[], int], grace_s: float) -> None:
        self._view = view
        self._readiness = readiness
        self._version_of = version_of
        self._grace_s = grace_s

    def check(self) -> float | None:
        """Set the condition now; seconds until it may change with no view change (None: not
        before the next one)."""
        now = time.monotonic()
        version = self._version_of()
        missing = self._view.unready_partitions(version, now, self._grace_s)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        self._readiness.set(CLUSTER_VIEW, not missing, f"no replica ready at version {version} in the view for {shown}")
        return self._view.next_departure_due(now, self._grace_s)

    async def run(self) -> None:
        while True:
            changed = asyncio.ensure_future(self._view.changed())
            try:
                await asyncio.wait({changed}, timeout=self.check())
            finally:
                changed.cancel()
