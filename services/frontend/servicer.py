"""``shardrec.v1.Recommender`` and ``FrontendAdmin``: validate, submit to the batcher, encode."""

from __future__ import annotations

import asyncio
import time
import uuid

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.errors import DeadlineExceededError
from services.core.rpc.errors import handle_errors
from services.frontend.batcher import MicroBatcher
from services.frontend.pipeline import Pending, RecommendPipeline, Recommendation


class RecommenderServicer(recommend_pb2_grpc.RecommenderServicer):
    """Thin handler. Runs on the event loop."""

    def __init__(self, pipeline: RecommendPipeline, batcher: MicroBatcher, *, default_timeout_s: float) -> None:
        self._pipeline = pipeline
        self._batcher = batcher
        self._default_timeout_s = default_timeout_s

    @handle_errors
    async def Recommend(self, request: recommend_pb2.RecommendRequest, context) -> recommend_pb2.RecommendResponse:
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._default_timeout_s
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        req = self._pipeline.prep.validate(request)  # bad input never joins a batch
        try:
            rec: Recommendation = await asyncio.wait_for(
                self._batcher.submit(Pending(req, time.monotonic() + remaining)), remaining
            )
        except TimeoutError:
            raise DeadlineExceededError(
                f"request {req.request_id!r} did not finish within its deadline of {remaining * 1e3:.0f} ms"
            ) from None
        resp = recommend_pb2.RecommendResponse(
            request_id=req.request_id, version=rec.version, shard_map_version=rec.shard_map_version
        )
        for pos, item, score in zip(rec.positions.tolist(), rec.item_ids.tolist(), rec.scores.tolist()):
            resp.items.add(item_id=item, score=score, position=pos)
        return resp


class FrontendAdminServicer(recommend_pb2_grpc.FrontendAdminServicer):
    """Counters of the batcher, feature prep and lookup step; with a cluster ``view``, also
    ``view_live_nodes`` (a gauge: shard nodes the frontend sees registered right now)."""

    def __init__(self, pipeline: RecommendPipeline, batcher: MicroBatcher, view=None) -> None:
        self._pipeline = pipeline
        self._batcher = batcher
        self._view = view

    @handle_errors
    async def GetStats(self, request, context) -> recommend_pb2.GetStatsResponse:
        b, prep, lk = self._batcher.stats, self._pipeline.prep, self._pipeline.lookup.stats
        counters = {
            "batches": b.batches,
            "requests_batched": b.items,
            "multi_request_batches": b.multi_item_batches,
            "largest_batch": b.largest_batch,
            "rejected_queue_full": b.rejected_full,
            "item_ids_requested": prep.item_ids_requested,
            "item_ids_unique": prep.item_ids_unique,
            "redis_round_trips": prep.redis_round_trips,
            "bags_requested": self._pipeline.bags_requested,
            "bags_looked_up": self._pipeline.bags_looked_up,
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
        if self._view is not None:
            counters["view_live_nodes"] = len(self._view.nodes)
        return recommend_pb2.GetStatsResponse(counters=counters, version=self._pipeline.version)
