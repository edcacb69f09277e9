"""Scoring: the pooled vectors of a micro-batch gathered per sample, scored by the ranker's
``Scorer``, then each request's top-k (``services.ranker.topk``).

For S samples and F sparse features of dim D, the scorer gets ``batch.dense`` float32
[S, num_dense] and the gathered float32 [S, F, D], and returns float32 [S] scores.
"""

from __future__ import annotations

import numpy as np

from services.core.checkpoint.manifest import ModelSpec
from services.core.types import FeatureSide
from services.frontend.batch import PreparedBatch, Recommendation
from services.frontend.lookup import LookupResult
from services.ranker.scorer import Scorer
from services.ranker.topk import top_k


def gather(spec: ModelSpec, batch: PreparedBatch, pooled: dict[str, np.ndarray], twins: dict[str, np.ndarray | None]) -> np.ndarray:
    """float32 [S, F, D]: each sample's pooled vector of every sparse feature, in manifest order
    (its user context's or item's bag; through ``twins[f]``, the unique twin of each bag, when
    identical bags were pooled once)."""
    dim = spec.dense_arch.embedding_dim
    sparse = np.empty((batch.num_samples, len(spec.sparse_features), dim), dtype=np.float32)
    for fi, f in enumerate(spec.sparse_features):
        index = batch.user_of_sample if f.side is FeatureSide.USER else batch.item_of_sample
        if twins[f.name] is not None:
            index = twins[f.name][index]
        np.take(pooled[f.name], index, axis=0, out=sparse[:, fi, :])
    return sparse


async def score_and_rank(
    scorer: Scorer, spec: ModelSpec, batch: PreparedBatch, result: LookupResult, twins: dict[str, np.ndarray | None]
) -> list[Recommendation]:
    """Every request of ``batch`` answered with its top-k, at the lookup's version and map."""
    scores = await scorer.score(batch.dense, gather(spec, batch, result.pooled, twins))
    out = []
    for r, req in enumerate(batch.requests):
        lo, hi = int(batch.sample_offsets[r]), int(batch.sample_offsets[r + 1])
        s = scores[lo:hi]
        best = top_k(s, req.top_k)
        out.append(Recommendation(req.request_id, best, req.candidates[best], s[best], result.version, result.shard_map_version))
    return out
