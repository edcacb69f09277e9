"""The frontend's version follower: switch to the target version only when it is servable.

Rule (docs/checkpoint.md, "Serving a new version"): the frontend switches from its version to
the cluster's ``target_version`` T once every partition of the active shard map has a live
replica that reports T ready. It loads T's dense weights first (in an executor), then swaps the
pipeline's ``ServingModel`` (version + dense weights together), so every later batch is computed
at T while a batch already running finishes at the version it started with. It then reports T
in its own znode (shards keep the rows of a version some live frontend serves) and records T
as the cluster's ``serving_version`` (what a restarted shard rebuilds before registering).

With an embedding cache (docs/cache.md), the rows that may differ between the two versions
(``CheckpointReader.changed_ids``, read in an executor with the weights) are dropped from it in
the same step as the swap, so no batch at T reads a row of the old version; the other rows stay.

A target whose dense weights cannot be read, or whose model differs from the one served, is
logged and not switched to; the follower tries it again when the target is written again.

Runs on the event loop; every ZooKeeper and checkpoint call goes to an executor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import ShardrecError
from services.frontend.lookup.cache.store import RowCache, version_changes
from services.frontend.pipeline import RecommendPipeline
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)


class VersionFollower:
    def __init__(
        self,
        view: ClusterView,
        pipeline: RecommendPipeline,
        reader: CheckpointReader,
        on_switch: Callable[[int], Awaitable[None]],
        *,
        cache: RowCache | None = None,
    ) -> None:
        self._view = view
        self._pipeline = pipeline
        self._reader = reader
        self._on_switch = on_switch
        self._cache = cache
        self._refused: int | None = None
        self.switches = 0

    def _due(self) -> int | None:
        t = self._view.target_version
        if not t or t == self._pipeline.version or t == self._refused or not self._view.ready_everywhere(t):
            return None
        return t

    async def run(self) -> None:
        while True:
            changed = asyncio.ensure_future(self._view.changed())
            target = self._due()
            if target is not None:
                await self._switch(target)
            try:
                await changed
            finally:
                changed.cancel()
            if self._refused is not None and self._view.target_version != self._refused:
                self._refused = None

    async def _changes(self, old: int, new: int, spec) -> dict | None:
        """The ids per table that may differ between ``old`` and ``new`` (None: all of them)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, version_changes, self._reader, old, new, [t.name for t in spec.tables])
        except (ShardrecError, OSError, ValueError) as e:
            log.warning("could not read what changed between versions %d and %d (%s): the embedding cache starts empty", old, new, e)
            return None

    async def _switch(self, target: int) -> None:
        loop = asyncio.get_running_loop()
        old = self._pipeline.model
        try:
            spec = (await loop.run_in_executor(None, self._reader.manifest, target)).model
            if spec != self._pipeline.spec:
                raise ShardrecError(f"version {target} is another model than the one served ({spec.name!r})")
            state = await loop.run_in_executor(None, self._reader.dense_state, target)
            scorer = await loop.run_in_executor(None, old.scorer.with_weights, state)
        except (ShardrecError, OSError, ValueError) as e:
            self._refused = target
            log.error("not switching to version %d, still serving %d: %s", target, old.version, e)
            return
        changes = await self._changes(old.version, target, spec) if self._cache is not None else None
        if not self._view.ready_everywhere(target):  # a replica left while the weights loaded
            return
        if self._cache is not None:
            dropped = self._cache.advance(old.version, target, changes)
            log.info("embedding cache: %d rows dropped for version %d, %d kept", dropped, target, self._cache.rows_held)
        self._pipeline.switch(target, scorer)
        self.switches += 1
        log.info("switched from version %d to %d", old.version, target)
        try:
            await self._on_switch(target)
        except Exception as e:  # ZooKeeper away: serving goes on; the znode catches up on the next switch
            log.warning("switched to version %d but could not report it: %r", target, e)
