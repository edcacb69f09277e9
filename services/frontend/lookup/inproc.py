"""``InprocLookupClient``: the in-process twin of the shard fan-out, every table of one version
memory-mapped in this process (the monolith baseline, ``--lookup inproc``, and tests' oracle)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.core import pooling
from services.core.checkpoint.reader import CheckpointReader
from services.core.types import Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats


class InprocLookupClient:
    """Every table of one version, memory-mapped in this process; pooling in a worker thread."""

    def __init__(self, reader: CheckpointReader, version: Version) -> None:
        self.version = version
        spec = reader.manifest(version).model
        self._tables = {t.name: pooling.as_weight(reader.open_table(version, t.name, verify=False)) for t in spec.tables}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inproc-lookup")
        self.stats = LookupStats()

    def _pool_all(self, features: list[FeatureLookup]) -> dict[str, np.ndarray]:
        return {
            f.feature: pooling.pool(self._tables[f.table], f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
            for f in features
        }

    async def lookup(self, features, *, version, timeout_s, request_id) -> LookupResult:
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool_all, features)
        return LookupResult(pooled, self.version, 0)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
