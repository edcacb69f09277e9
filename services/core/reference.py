"""The reference path: the whole model in one process, unsharded. THE oracle of every test.

It pools with its own plain code (float64, one bag at a time: slow and obviously right, never
the serving kernels) over the checkpoint's full tables, and runs the shared ``dense.DLRM``.
Distributed results must equal it within rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import numpy as np
import torch

from services.core.checkpoint.reader import CheckpointReader
from services.core.dense import build_dlrm, scores_from_logits
from services.core.types import PoolingType, Version


def reference_pool(
    table: np.ndarray,
    ids: np.ndarray,
    lengths: np.ndarray,
    pooling: PoolingType,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Pool bags of GLOBAL row ids of ``table`` [rows, dim] -> float32 [bags, dim].

    An empty bag pools to zeros; MEAN divides the (weighted) sum by the bag's id count.
    """
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    assert lengths.sum() == len(ids), "lengths must add up to the number of ids"
    out = np.zeros((len(lengths), table.shape[1]), dtype=np.float64)
    start = 0
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = np.asarray(table[ids[start : start + n]], dtype=np.float64)
        if weights is not None:
            rows = rows * np.asarray(weights[start : start + n], dtype=np.float64)[:, None]
        if pooling is PoolingType.SUM:
            out[b] = rows.sum(axis=0)
        elif pooling is PoolingType.MEAN:
            out[b] = rows.sum(axis=0) / n
        else:
            out[b] = rows.max(axis=0)
        start += n
    return out.astype(np.float32)


class ReferenceModel:
    """One version of a checkpoint, whole, in this process (tables memory-mapped)."""

    def __init__(self, checkpoint_uri: str, version: Version | None = None) -> None:
        self.reader = CheckpointReader(checkpoint_uri)
        self.version = self.reader.latest_version() if version is None else version
        self.manifest = self.reader.manifest(self.version)
        self.spec = self.manifest.model
        self._tables = {t.name: self.reader.open_table(self.version, t.name) for t in self.spec.tables}
        self._dlrm = build_dlrm(self.spec.dense_arch, self.reader.dense_state(self.version))

    def table(self, name: str) -> np.ndarray:
        return self._tables[name]

    def pool(self, table: str, ids, lengths, pooling: PoolingType, weights=None) -> np.ndarray:
        return reference_pool(self._tables[table], ids, lengths, pooling, weights)

    def scores(self, dense: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """``dense`` float32 [B, num_dense], ``pooled`` float32 [B, F, D] -> scores float32 [B]."""
        with torch.inference_mode():
            logits = self._dlrm(torch.as_tensor(dense, dtype=torch.float32), torch.as_tensor(pooled, dtype=torch.float32))
            return scores_from_logits(logits).numpy()
