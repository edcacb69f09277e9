"""``FeatureSync``: the frontend's watch over its feature store. It publishes readiness from the
store's state (gRPC health), reads the marker when no batch did lately (so a store lost while
idle is noticed, and an open breaker is probed back without traffic), and, when the store is
lost, reloads it from the checkpoint's feature files under the store's lock: one frontend loads
a new generation, the others wait for its marker. Why the reload lives here and not in a
process of its own: docs/features.md ("Self-healing").

Event loop only; the reload itself runs in a process of its own (``reload_lost_store``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from services.core.config import RedisAuth
from services.core.errors import ShardrecError
from services.core.feature_store import LoadBusyError, LoadResult
from services.frontend.feature_store import FeatureStoreClient, FeatureStoreState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadSource:
    """What a reload loads and where: the checkpoint and manifest version the frontend serves
    (its layouts), the root of the feature files (``features/{users,items}.npz``), Redis, the
    key prefix and Redis AUTH / TLS (handed to the spawned process in its pickled arguments,
    never on a command line)."""

    checkpoint: str
    version: int
    features: str
    redis_url: str
    prefix: str
    redis_auth: RedisAuth = RedisAuth()


def reload_lost_store(source: ReloadSource, min_generation: int) -> LoadResult | None:
    """Load the checkpoint's feature files as a new generation if the store has no marker (also
    once its lock is held); None when it has one. Runs in a spawned process: a load is seconds of
    CPU (the demo preset: 700k records), which in a thread would compete with serving for the
    GIL (measured about 3x slower on a busy 2-core machine)."""
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_redis
    from services.core.feature_store import StoreKeys, load_generation, read_marker
    from services.core.features import FeatureLayout
    from services.core.synth import load_feature_rows
    from services.core.types import FeatureSide

    reader = CheckpointReader(source.checkpoint)
    spec = reader.manifest(source.version).model
    layouts = (FeatureLayout(spec, FeatureSide.USER), FeatureLayout(spec, FeatureSide.ITEM))
    keys = StoreKeys.of(source.prefix, *layouts)
    client = make_redis(source.redis_url, timeout_s=10.0, auth=source.redis_auth)
    try:
        if read_marker(client, keys) is not None:
            return None
        sides = [(layout, load_feature_rows(source.features, layout.side)) for layout in layouts]
        return load_generation(client, keys, sides, source=source.features, version=source.version,
                               only_if_missing=True, min_generation=min_generation)  # fmt: skip
    finally:
        client.close()


class FeatureSync:
    """``publish(state)`` is awaited with each new store state (``publish_state``, then ``run``).
    ``source`` (None: this frontend never reloads) is what ``reload_lost_store`` loads, in a
    spawned process, when the store is lost. ``check_s``: the marker is read when no answer came
    from Redis for that long; ``retry_s``: the pause after a failed reload, doubled for each
    failure in a row up to 16 times."""

    def __init__(
        self,
        store: FeatureStoreClient,
        publish: Callable[[FeatureStoreState], Awaitable[None]],
        source: ReloadSource | None,
        *,
        check_s: float = 1.0,
        retry_s: float = 2.0,
    ) -> None:
        self._store = store
        self._publish = publish
        self._source = source
        self._executor: ProcessPoolExecutor | None = None
        self._check_s = check_s
        self._retry_s = retry_s
        self._wake = asyncio.Event()
        self._reloading: asyncio.Task | None = None
        self._next_reload_at = 0.0
        self._published: FeatureStoreState | None = None
        self.reloads = 0  # generations this frontend loaded
        self.reload_failures = 0
        self._failed_in_a_row = 0
        store.on_change = self._wake.set

    async def publish_state(self) -> FeatureStoreState:
        """Publish the store's state if it changed since the last time; return it."""
        state = self._store.state
        if state is not self._published:
            self._published = state
            await self._publish(state)
        return state

    async def run(self) -> None:
        """Until cancelled (a reload in flight finishes in its process; ``close`` waits for it)."""
        while True:
            state = await self.publish_state()
            if state is FeatureStoreState.LOST and self._source is not None:
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
        if self._executor is None:
            import multiprocessing

            # spawn, never fork a process that runs grpc; one process per reload, then it exits
            self._executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
        seen = self._store.marker
        reload = functools.partial(reload_lost_store, self._source, 1 if seen is None else seen.generation + 1)
        try:
            result = await loop.run_in_executor(self._executor, reload)
        except LoadBusyError as e:
            log.info("feature store lost; another load is under way (%s)", e)
            self._next_reload_at = time.monotonic() + self._check_s
        except Exception as e:  # noqa: BLE001 - logged, counted and retried: the store stays lost meanwhile
            self.reload_failures += 1
            wait_s = self._retry_s * 2 ** min(self._failed_in_a_row, 4)
            self._failed_in_a_row += 1
            self._next_reload_at = time.monotonic() + wait_s
            if isinstance(e, BrokenProcessPool):  # the reload's process died: a new one next time
                self._executor = None
            log.error("feature store lost and its reload failed (retry in %.0f s): %s", wait_s, e)
        else:
            self._failed_in_a_row = 0
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
        """Wait for a reload in flight, then let its process go."""
        if self._reloading is not None:
            await asyncio.gather(self._reloading, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
