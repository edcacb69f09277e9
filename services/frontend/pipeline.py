"""One micro-batch, end to end: feature prep -> lookup -> dense model -> top-k per request.

Every request of a batch is computed at one version with one shard map, and its response
names them. Runs on the event loop; the ranker's ``Scorer`` keeps the forward pass off it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import DeadlineExceededError
from services.core.types import FeatureSide, Version
from services.frontend.batch import RecRequest, unique_bags
from services.frontend.features import FeaturePrep
from services.frontend.lookup import FeatureLookup, LookupClient
from services.ranker.scorer import Scorer
from services.ranker.topk import top_k


@dataclass(frozen=True)
class Recommendation:
    request_id: str
    positions: np.ndarray  # int64 [k], candidate positions, best first
    item_ids: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    version: Version
    shard_map_version: int


@dataclass(frozen=True)
class Pending:
    """A request waiting in the batcher, with its absolute deadline (time.monotonic())."""

    request: RecRequest
    deadline: float


@dataclass(frozen=True)
class ServingModel:
    """The version a batch is computed at and the dense model of exactly that version."""

    version: Version
    scorer: Scorer


class RecommendPipeline:
    def __init__(self, spec: ModelSpec, prep: FeaturePrep, lookup: LookupClient, scorer: Scorer, version: Version) -> None:
        self.spec = spec
        self.prep = prep
        self.lookup = lookup
        self.model = ServingModel(version, scorer)
        self._batch_ids = itertools.count(1)
        self.bags_requested = 0  # bags the batches needed, per feature
        self.bags_looked_up = 0  # distinct bags actually pooled (identical bags pooled once)

    @property
    def version(self) -> Version:
        return self.model.version

    def switch(self, version: Version, scorer: Scorer) -> None:
        """Serve ``version`` from the next batch on; a batch already running finishes at the
        version it started with (it holds its own ``ServingModel``)."""
        self.model = ServingModel(version, scorer)

    async def process(self, items: list[Pending]) -> list[Recommendation | BaseException]:
        now = time.monotonic()
        live = [p for p in items if p.deadline > now]
        results: dict[int, Recommendation | BaseException] = {
            id(p): DeadlineExceededError(f"request {p.request.request_id!r} expired while queued") for p in items if p.deadline <= now
        }
        if live:
            for p, r in zip(live, await self._run([p.request for p in live], max(p.deadline for p in live)), strict=True):
                results[id(p)] = r
        return [results[id(p)] for p in items]

    async def _run(self, requests: list[RecRequest], deadline: float) -> list[Recommendation]:
        model = self.model  # one version for the whole batch: lookups and dense weights
        batch = await self.prep.prepare(requests)
        features, twins = [], {}
        for f in self.spec.sparse_features:
            bags = (batch.user_bags if f.side is FeatureSide.USER else batch.item_bags)[f.name]
            unique, twins[f.name] = unique_bags(bags)
            self.bags_requested += len(bags.lengths)
            self.bags_looked_up += len(unique.lengths)
            features.append(FeatureLookup(f.name, f.table, f.pooling, unique, f.side))
        tag = f"batch-{next(self._batch_ids)}:{requests[0].request_id}"
        result = await self.lookup.lookup(features, version=model.version, timeout_s=deadline - time.monotonic(), request_id=tag)
        dim = self.spec.dense_arch.embedding_dim
        sparse = np.empty((batch.num_samples, len(features), dim), dtype=np.float32)
        for fi, f in enumerate(self.spec.sparse_features):
            index = batch.user_of_sample if f.side is FeatureSide.USER else batch.item_of_sample
            if twins[f.name] is not None:
                index = twins[f.name][index]
            np.take(result.pooled[f.name], index, axis=0, out=sparse[:, fi, :])
        scores = await model.scorer.score(batch.dense, sparse)
        out = []
        for r, req in enumerate(requests):
            lo, hi = int(batch.sample_offsets[r]), int(batch.sample_offsets[r + 1])
            s = scores[lo:hi]
            best = top_k(s, req.top_k)
            out.append(Recommendation(req.request_id, best, req.candidates[best], s[best], result.version, result.shard_map_version))
        return out
