"""Scoring: the pooled vectors of a micro-batch gathered per sample, scored by the ranker's
``Scorer``, then each request's top-k (``services.ranker.topk``).

For S samples and F sparse features of dim D, the scorer gets ``batch.dense`` float32
[S, num_dense] and the gathered float32 [S, F, D], and returns float32 [S] scores.
"""

from __future__ import annotations

import numpy as np

from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import InvalidArgumentError, ShardrecError
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
    scorer: Scorer,
    spec: ModelSpec,
    batch: PreparedBatch,
    result: LookupResult,
    twins: dict[str, np.ndarray | None],
    *,
    keep: list[int] | None = None,
) -> list[Recommendation | BaseException]:
    """The requests ``keep`` of ``batch`` (indices; None: all) answered with their top-k, at the
    lookup's version and map: only their samples go through the forward pass. A request whose
    scores are not finite fails alone (INVALID_ARGUMENT when its own request-time values may be
    the cause, INTERNAL otherwise), never an OK answer in arbitrary order."""
    rows = range(len(batch.requests)) if keep is None else keep
    bounds = [(int(batch.sample_offsets[r]), int(batch.sample_offsets[r + 1])) for r in rows]
    sparse = gather(spec, batch, result.pooled, twins)
    dense = batch.dense
    if keep is not None:
        samples = np.concatenate([np.arange(lo, hi) for lo, hi in bounds])
        sparse, dense = sparse[samples], dense[samples]
    scores = await scorer.score(dense, sparse)
    out: list[Recommendation | BaseException] = []
    start = 0
    for r, (lo, hi) in zip(rows, bounds, strict=True):
        req = batch.requests[r]
        s = scores[start : start + hi - lo]
        start += hi - lo
        if not np.isfinite(s).all():
            out.append(_not_finite(req))
            continue
        best = top_k(s, req.top_k)
        out.append(Recommendation(req.request_id, best, req.candidates[best], s[best], result.version, result.shard_map_version))
    return out


def _not_finite(req) -> ShardrecError:
    if req.dense_overrides or req.sparse_overrides:
        return InvalidArgumentError(
            f"request {req.request_id!r}: the model gave non-finite scores for its request-time values "
            f"(dense_features {sorted(req.dense_overrides)}, sparse_features {sorted(req.sparse_overrides)}); "
            f"give values of a smaller magnitude"
        )
    return ShardrecError(f"request {req.request_id!r}: the model gave non-finite scores from stored features")
