"""``FeatureSync``: the frontend's watch over its feature store. It publishes readiness from the
store's state (gRPC health), reads the marker when no batch did lately (so a store lost while
idle is noticed, and an open breaker is probed back without traffic), and, when the store is
lost, reloads it from the checkpoint's feature files under the store's lock: one frontend loads
a new generation, the others wait for its marker. Why the reload lives here and not in a
process of its own: docs/features.md ("Self-healing").

Event loop only; the reload itself runs in an executor thread with its own Redis client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from services.core.errors import ShardrecError
from services.core.feature_store import LoadBusyError, LoadResult
from services.frontend.feature_store import FeatureStoreClient, FeatureStoreState

log = logging.getLogger(__name__)


class FeatureSync:
    """``publish(state)`` is awaited with each new store state (``publish_state``, then ``run``).
    ``reload()`` (None: this frontend never reloads) loads a lost store if it is still lost when
    the lock is held, blocking, in a thread; it returns the load or None. ``check_s``: the marker
    is read when no answer came from Redis for that long; ``retry_s``: the pause after a failed
    reload."""

    def __init__(
        self,
        store: FeatureStoreClient,
        publish: Callable[[FeatureStoreState], Awaitable[None]],
        reload: Callable[[], LoadResult | None] | None,
        *,
        check_s: float = 1.0,
        retry_s: float = 2.0,
    ) -> None:
        self._store = store
        self._publish = publish
        self._reload = reload
        self._check_s = check_s
        self._retry_s = retry_s
        self._wake = asyncio.Event()
        self._reloading: asyncio.Task | None = None
        self._next_reload_at = 0.0
        self._published: FeatureStoreState | None = None
        self.reloads = 0  # generations this frontend loaded
        self.reload_failures = 0
        store.on_change = self._wake.set

    async def publish_state(self) -> FeatureStoreState:
        """Publish the store's state if it changed since the last time; return it."""
        state = self._store.state
        if state is not self._published:
            self._published = state
            await self._publish(state)
        return state

    async def run(self) -> None:
        """Until cancelled (the reload thread, if any, finishes its load)."""
        while True:
            state = await self.publish_state()
            if state is FeatureStoreState.LOST and self._reload is not None:
                self._maybe_reload()
            try:
                await asyncio.wait_for(self._wake.wait(), self._check_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if time.monotonic() - self._store.last_answer_at >= self._check_s:
                try:
                    await self._store.refresh()
                except ShardrecError as e:
                    log.debug("feature store check: %s", e)

    def _maybe_reload(self) -> None:
        if self._reloading is not None or time.monotonic() < self._next_reload_at:
            return
        self._reloading = asyncio.create_task(self._reload_once())

    async def _reload_once(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            result = await loop.run_in_executor(None, self._reload)  # type: ignore[arg-type]
        except LoadBusyError as e:
            log.info("feature store lost; another load is under way (%s)", e)
            self._next_reload_at = time.monotonic() + self._check_s
        except Exception as e:  # noqa: BLE001 - logged, counted and retried: the store stays lost meanwhile
            self.reload_failures += 1
            self._next_reload_at = time.monotonic() + self._retry_s
            log.error("feature store lost and its reload failed (retry in %.0f s): %s", self._retry_s, e)
        else:
            if result is not None:
                self.reloads += 1
                m = result.marker
                log.warning("feature store reloaded by this frontend: generation %d, %d users, %d items in %.2f s",
                            m.generation, m.users, m.items, time.monotonic() - t0)  # fmt: skip
            try:
                await self._store.refresh()  # ready again without waiting for a batch
            except ShardrecError as e:
                log.info("feature store check after the reload: %s", e)
        finally:
            self._reloading = None
            self._wake.set()

    async def close(self) -> None:
        """Wait for a reload in flight (its thread cannot be interrupted)."""
        if self._reloading is not None:
            await asyncio.gather(self._reloading, return_exceptions=True)

    def counters(self) -> dict[str, int]:
        return {"feature_syncs": self.reloads, "feature_sync_failures": self.reload_failures}
