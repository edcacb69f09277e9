"""One micro-batch, end to end: feature prep (``features``) -> lookup (``lookup/``) -> scoring
and top-k (``scoring``), for the requests the batcher (``batching``) hands it.

Every request of a batch is computed at one version with one shard map, and its response
names them. Runs on the event loop; the ranker's ``Scorer`` keeps the forward pass off it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
from opentelemetry import trace

from services._proto.shardrec.v1 import recommend_pb2
from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import DeadlineExceededError, ShardrecError
from services.core.metrics import FEATURE_STORE_FAILURES, FrontendReading
from services.core.types import FeatureSide, Version
from services.frontend.batch import Pending, PreparedBatch, RecRequest, Recommendation, unique_bags
from services.frontend.features import FeaturePrep
from services.frontend.lookup import FeatureLookup, LookupClient
from services.frontend.observe import Observer
from services.frontend.scoring import score_and_rank
from services.ranker.scorer import Scorer

log = logging.getLogger(__name__)
# Where a dead request was dropped (the key names its GetStats counter ``dropped_<key>``).
_STAGES = {"queued": "while queued", "after_features": "after its features were read", "after_lookup": "during its embedding lookup"}


def _may_belong_to_one_request(exc: Exception) -> bool:
    """Bad input (INVALID_ARGUMENT) or a bug (INTERNAL) may be one request's doing; a cluster
    condition (unavailable, overloaded, out of time, re-routed) is everyone's."""
    return not isinstance(exc, ShardrecError) or exc.grpc_code in ("INVALID_ARGUMENT", "INTERNAL")


@dataclass(frozen=True)
class ServingModel:
    """The version a batch is computed at and the dense model of exactly that version."""

    version: Version
    scorer: Scorer


class RecommendPipeline:
    def __init__(self, spec: ModelSpec, prep: FeaturePrep, lookup: LookupClient, scorer: Scorer, version: Version,
                 observer: Observer | None = None) -> None:
        self.spec = spec
        self._obs = observer or Observer.off()
        self.prep = prep
        self.lookup = lookup
        self.model = ServingModel(version, scorer)
        self._batch_ids = itertools.count(1)
        self.bags_requested = 0  # bags the batches needed, per feature
        self.bags_looked_up = 0  # distinct bags actually pooled (identical bags pooled once)
        self.dropped: dict[str, int] = {}  # stage -> dead requests dropped before it
        self.batch_splits = 0  # batches split to isolate a failure that may be one request's
        self.answered_too_late = 0  # answers computed for callers already gone (wasted work)
        self.degraded_feature_defaults = 0  # answers computed from feature defaults (store lost, operator's choice)

    @property
    def version(self) -> Version:
        return self.model.version

    def switch(self, version: Version, scorer: Scorer) -> None:
        """Serve ``version`` from the next batch on; a batch already running finishes at the
        version it started with (it holds its own ``ServingModel``)."""
        self.model = ServingModel(version, scorer)

    async def process(self, items: list[Pending]) -> list[Recommendation | BaseException]:
        """The batcher's ``process``: one result per item, in order. Requests that are dead
        (expired, or their caller gone) are dropped before every stage, so no Redis read,
        Lookup or forward pass is spent on them; a failure that may belong to one request
        (bad input the validation could not see, a bug) is isolated by splitting the batch."""
        results: dict[int, Recommendation | BaseException] = {}
        obs = self._obs
        obs.metrics.batch(len(items))
        obs.queued(items, time.monotonic())
        span = obs.batch_span([p.span for p in items])
        try:
            with trace.use_span(span, end_on_exit=False):  # the parent of the batch's stage and Lookup spans
                live = self._alive(items, results, "queued")
                if live:
                    await self._isolated(live, results)
        finally:
            span.end()
        return [results[id(p)] for p in items]

    def _alive(self, items: list[Pending], results: dict, stage: str) -> list[Pending]:
        """``items`` still worth working on; the others get their answer in ``results``."""
        now = time.monotonic()
        live = []
        for p in items:
            if not p.dead(now):
                live.append(p)
                continue
            self.dropped[stage] = self.dropped.get(stage, 0) + 1
            why = "was cancelled by its caller" if p.abandoned else "ran out of its deadline"
            results[id(p)] = DeadlineExceededError(
                f"request {p.request.request_id!r} {why} {_STAGES[stage]}; nothing more was spent on it"
            )
        return live

    async def _isolated(self, items: list[Pending], results: dict) -> None:
        try:
            await self._run(items, results)
        except Exception as e:  # noqa: BLE001 - sorted below: isolate, or deliver to the batch
            if len(items) == 1 or not _may_belong_to_one_request(e):
                for p in items:
                    results.setdefault(id(p), e)
                return
            self.batch_splits += 1
            log.warning("batch of %d requests failed (%s); splitting it so only the request at fault fails", len(items), e)
            half = len(items) // 2
            await asyncio.gather(self._isolated(items[:half], results), self._isolated(items[half:], results))

    async def _run(self, items: list[Pending], results: dict) -> None:
        model = self.model  # one version for the whole batch: lookups and dense weights
        with self._obs.stage("features"):
            batch = await self.prep.prepare([p.request for p in items], deadline=max(p.deadline for p in items))
        live = self._alive(items, results, "after_features")
        if not live:
            return
        if len(live) < len(items):
            kept = {id(p) for p in live}
            batch = batch.subset([i for i, p in enumerate(items) if id(p) in kept])
        features, twins = self._feature_lookups(batch)
        deadline = max(p.deadline for p in live)
        tag = f"batch-{next(self._batch_ids)}"  # never a caller's string: one batch serves many callers
        with self._obs.stage("lookup"):
            result = await self.lookup.lookup(features, version=model.version, timeout_s=deadline - time.monotonic(), request_id=tag)
        scoring = self._alive(live, results, "after_lookup")
        if not scoring:
            return
        kept = {id(p) for p in scoring}
        keep = None if len(scoring) == len(live) else [i for i, p in enumerate(live) if id(p) in kept]
        with self._obs.stage("score"):
            answers = await score_and_rank(model.scorer, self.spec, batch, result, twins, keep=keep)
        now = time.monotonic()
        for p, rec in zip(scoring, answers, strict=True):
            if batch.feature_defaults:
                self.degraded_feature_defaults += 1
                rec = replace(rec, degraded_reasons=(*rec.degraded_reasons, recommend_pb2.DEGRADED_FEATURE_DEFAULTS))
            results[id(p)] = rec
            if p.dead(now):
                self.answered_too_late += 1  # computed in full for a caller already gone

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

    def fill(self, r: FrontendReading) -> None:
        """Feature prep, bag dedup and batch-failure counters into ``r`` (``core.metrics``)."""
        prep = self.prep
        r.item_ids_requested, r.item_ids_unique = prep.item_ids_requested, prep.item_ids_unique
        r.feature_store_round_trips = prep.redis_round_trips
        r.batch_splits, r.wasted = self.batch_splits, self.answered_too_late
        r.dropped.update(self.dropped)
        r.bags_requested, r.bags_looked_up = self.bags_requested, self.bags_looked_up
        r.model_version = self.model.version
        r.degraded["feature_defaults"] = self.degraded_feature_defaults
        st = prep.store
        r.feature_store = st.state.name.lower() if st.configured else "none"
        r.feature_store_generation = 0 if st.marker is None else st.marker.generation
        r.feature_store_lost, r.feature_store_switches, r.feature_store_marker_reads = st.lost_total, st.switches, st.marker_reads
        r.feature_store_default_batches = st.defaults_served
        r.feature_store_failures = dict(zip(FEATURE_STORE_FAILURES, (st.timeouts, st.errors, st.fast_failures), strict=True))
        r.feature_store_breaker_opens = st.breaker.times_opened
        r.feature_store_breaker_open = st.breaker.open_until is not None
