"""Scoring: the pooled vectors of a micro-batch gathered per scored sample, scored by the
ranker's ``Scorer``, then each request's top-k (``services.ranker.topk``).

The forward pass sees each distinct (scoring context, item) of a batch once
(``PreparedBatch.scored``: a request, or a user context shared by requests without dense
overrides): for D such samples and F sparse features of dim D_e, the scorer gets float32 [D, num_dense] and the gathered
float32 [D, F, D_e], and returns float32 [D] scores, copied back to every candidate position, so
a repeated candidate gets bit-identical scores (docs/features.md, "Repeated candidates").
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


def gather(
    spec: ModelSpec,
    batch: PreparedBatch,
    pooled: dict[str, np.ndarray],
    twins: dict[str, np.ndarray | None],
    samples: np.ndarray | None = None,
) -> np.ndarray:
    """float32 [n, F, D]: the pooled vector of every sparse feature, in manifest order, of each
    of the ``samples`` (indices; None: all S in order): its user context's or item's bag
    (through ``twins[f]``, the unique twin of each bag, when identical bags were pooled once)."""
    dim = spec.dense_arch.embedding_dim
    n = batch.num_samples if samples is None else len(samples)
    sparse = np.empty((n, len(spec.sparse_features), dim), dtype=np.float32)
    for fi, f in enumerate(spec.sparse_features):
        index = batch.user_of_sample if f.side is FeatureSide.USER else batch.item_of_sample
        if samples is not None:
            index = index[samples]
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
    lookup's version and map: only their distinct candidates go through the forward pass, each
    position then gets its candidate's score. A request whose scores are not finite fails alone
    (INVALID_ARGUMENT when its own request-time values may be the cause, INTERNAL otherwise),
    never an OK answer in arbitrary order."""
    scored, offsets = batch.scored, batch.sample_offsets
    rows = range(len(batch.requests)) if keep is None else keep
    samples: np.ndarray | None = None  # all, in sample order
    if keep is not None:
        samples, positions = scored.of_requests(offsets, keep)
    else:
        # each request's positions, each pointing at its distinct candidate's score
        positions = [scored.of_sample[int(offsets[r]) : int(offsets[r + 1])] for r in rows]
        if not scored.all_distinct:
            samples = scored.samples
    sparse = gather(spec, batch, result.pooled, twins, samples)
    scores = await scorer.score(batch.dense if samples is None else batch.dense[samples], sparse)
    out: list[Recommendation | BaseException] = []
    for r, at in zip(rows, positions, strict=True):
        req = batch.requests[r]
        s = scores[at]
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
