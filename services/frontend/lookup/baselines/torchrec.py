"""The ``torchrec`` baseline's lookup step: every table of one version in TorchRec
``EmbeddingBagCollection``s in this process, on CPU — what a TorchRec user runs today. The
TorchRec side (and its install hint: torchrec is optional) is ``services.core.torchrec_pooling``.

Threads: ``lookup`` runs on the event loop; the forward passes run in a one-thread executor.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import InvalidArgumentError
from services.core.torchrec_pooling import TorchrecPooler
from services.core.types import Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats


class TorchrecLookupClient:
    """The ``LookupClient`` over a ``TorchrecPooler`` of ``version``'s tables (each copied once
    from the checkpoint). Raises ConfigError with install instructions when torchrec is missing."""

    def __init__(self, reader: CheckpointReader, version: Version) -> None:
        self.version = version
        self._spec = spec = reader.manifest(version).model
        self._pooler = TorchrecPooler(spec, lambda table: np.array(reader.open_table(version, table, verify=False)))
        self._features = {f.name: f for f in spec.sparse_features}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrec-lookup")
        self.stats = LookupStats()

    def _check(self, features: list[FeatureLookup]) -> None:
        for f in features:
            spec = self._features.get(f.feature)
            if spec is None or spec.table != f.table or spec.pooling is not f.pooling or spec.side is not f.side:
                raise InvalidArgumentError(
                    f"torchrec lookup: feature {f.feature!r} on table {f.table!r} ({f.pooling.value}, {f.side.value}) "
                    f"is not a sparse feature of model {self._spec.name!r} as configured"
                )
            rows = f.bags.rows
            n = self._spec.table(f.table).rows
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
                bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
                raise InvalidArgumentError(f"feature {f.feature!r}: row {bad} is outside [0, {n}) of table {f.table!r}")

    def _pool_all(self, features: list[FeatureLookup]) -> dict[str, np.ndarray]:
        return self._pooler.pool({f.feature: (f.bags.rows, f.bags.lengths, f.bags.weights) for f in features})

    async def lookup(self, features, *, version, timeout_s, request_id) -> LookupResult:
        self._check(features)
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool_all, features)
        return LookupResult(pooled, self.version, 0)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
