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
from services.core.types import FeatureSide, FeatureSource, MappingKind, PoolingType, Version


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


class ReferenceRecommender:
    """The whole Recommend computation, in one process, written plainly: the oracle of the
    end-to-end tests. Stored features come straight from the checkpoint's feature files (not
    from Redis), request-time values override them, raw values map to rows by the manifest's
    rule, every bag is pooled by ``reference_pool`` and the DLRM scores every candidate.
    """

    def __init__(self, checkpoint_uri: str, version: Version | None = None) -> None:
        from services.core.synth import load_feature_rows

        self.model = ReferenceModel(checkpoint_uri, version)
        self.spec = self.model.spec
        self._rows = {side: load_feature_rows(checkpoint_uri, side.value) for side in (FeatureSide.USER, FeatureSide.ITEM)}
        self._index = {
            side: {int(e): i for i, e in enumerate(rows[f"{side.value}_id"])} for side, rows in self._rows.items()
        }

    def _stored(self, side: FeatureSide, entity: int) -> tuple[dict[str, list[int]], dict[str, float]]:
        rows, i = self._rows[side], self._index[side].get(entity)
        sparse: dict[str, list[int]] = {}
        dense: dict[str, float] = {}
        for f in self.spec.sparse_features:
            if f.side is side and f.source is FeatureSource.STORED:
                if i is None:
                    sparse[f.name] = []
                else:
                    lengths = rows[f"{f.name}.lengths"]
                    start = int(lengths[:i].sum())
                    sparse[f.name] = [int(v) for v in rows[f"{f.name}.values"][start : start + int(lengths[i])]]
        for f in self.spec.dense_features:
            if f.side is side:
                dense[f.name] = f.default if i is None else float(rows[f.name][i])
        return sparse, dense

    def _to_row(self, table: str, mapping: MappingKind, value: int) -> int:
        rows = self.spec.table(table).rows
        if mapping is MappingKind.MODULO:
            return value % rows
        if not 0 <= value < rows:
            raise ValueError(f"value {value} out of range for identity table {table}")
        return value

    def scores(self, user_id: int, candidates, dense_overrides=None, sparse_overrides=None) -> np.ndarray:
        """Scores of every candidate, float32 [C]. ``sparse_overrides``: name -> (values, weights|None)."""
        dense_overrides = dense_overrides or {}
        sparse_overrides = sparse_overrides or {}
        user_sparse, user_dense = self._stored(FeatureSide.USER, user_id)
        dense_rows, pooled_rows = [], []
        for item in candidates:
            item_sparse, item_dense = self._stored(FeatureSide.ITEM, int(item))
            dense_rows.append([dense_overrides.get(f.name, {**user_dense, **item_dense}[f.name]) for f in self.spec.dense_features])
            pooled = []
            for f in self.spec.sparse_features:
                weights = None
                if f.source is FeatureSource.ENTITY_ID:
                    values = [user_id if f.side is FeatureSide.USER else int(item)]
                elif f.name in sparse_overrides:
                    values, weights = sparse_overrides[f.name]
                    values = [int(v) for v in values]
                else:
                    values = (user_sparse if f.side is FeatureSide.USER else item_sparse)[f.name]
                rows = [self._to_row(f.table, f.mapping, v) for v in values]
                w = None if weights is None else np.asarray(weights, dtype=np.float32)
                pooled.append(self.model.pool(f.table, np.asarray(rows, dtype=np.int64), [len(rows)], f.pooling, w)[0])
            pooled_rows.append(pooled)
        return self.model.scores(np.asarray(dense_rows, dtype=np.float32), np.asarray(pooled_rows, dtype=np.float32))
