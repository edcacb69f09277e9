"""One micro-batch, end to end: feature prep (``features``) -> lookup (``lookup/``) -> scoring
and top-k (``scoring``), for the requests the batcher (``batching``) hands it.

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
from services.frontend.batch import Pending, PreparedBatch, RecRequest, Recommendation, unique_bags
from services.frontend.features import FeaturePrep
from services.frontend.lookup import FeatureLookup, LookupClient
from services.frontend.scoring import score_and_rank
from services.ranker.scorer import Scorer


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
        """The batcher's ``process``: one result per item, in order; a request whose deadline
        passed while it was queued gets DEADLINE_EXCEEDED alone."""
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
        features, twins = self._feature_lookups(batch)
        tag = f"batch-{next(self._batch_ids)}:{requests[0].request_id}"
        result = await self.lookup.lookup(features, version=model.version, timeout_s=deadline - time.monotonic(), request_id=tag)
        return await score_and_rank(model.scorer, self.spec, batch, result, twins)

    def _feature_lookups(self, batch: PreparedBatch) -> tuple[list[FeatureLookup], dict[str, np.ndarray | None]]:
        """The bags to pool, per sparse feature, identical bags once (``unique_bags``); and per
        feature the index of each bag's unique twin (None when nothing repeats)."""
        features, twins = [], {}
        for f in self.spec.sparse_features:
            bags = (batch.user_bags if f.side is FeatureSide.USER else batch.item_bags)[f.name]
            unique, twins[f.name] = unique_bags(bags)
            self.bags_requested += len(bags.lengths)
            self.bags_looked_up += len(unique.lengths)
            features.append(FeatureLookup(f.name, f.table, f.pooling, unique, f.side))
        return features, twins

    def counters(self) -> dict[str, int]:
        """Feature prep, bag dedup and lookup counters (``FrontendAdmin.GetStats`` names)."""
        prep, lk = self.prep, self.lookup.stats
        return {
            "item_ids_requested": prep.item_ids_requested,
            "item_ids_unique": prep.item_ids_unique,
            "redis_round_trips": prep.redis_round_trips,
            "bags_requested": self.bags_requested,
            "bags_looked_up": self.bags_looked_up,
            "lookup_batches": lk.batches,
            "lookup_rpcs": lk.rpcs,
            "lookup_failovers": lk.failovers,
            "lookup_reroutes": lk.reroutes,
            "lookup_hedges": lk.hedges,
            "lookup_hedge_wins": lk.hedge_wins,
            "lookup_hedges_cancelled": lk.hedges_cancelled,
            "lookup_stall_retries": lk.stall_retries,
            "lookup_ejections": lk.ejections,
            "lookup_ids_sent": lk.ids_sent,
            "lookup_request_bytes": lk.request_bytes,
            "lookup_response_bytes": lk.response_bytes,
            **{f"wire_bytes_{side}": n for side, n in lk.wire_bytes_by_side.items()},
            **{f"node_rpcs_{node}": n for node, n in lk.per_node_rpcs.items()},  # hedges included
        }
