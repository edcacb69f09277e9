"""``shardrec.v1.Recommender`` and ``FrontendAdmin``: decode, one call into the ``Recommender``,
encode. Errors become statuses in ``services.core.rpc.errors``."""

from __future__ import annotations

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.rpc.errors import handle_errors
from services.frontend.recommender import Recommender


class RecommenderServicer(recommend_pb2_grpc.RecommenderServicer):
    """Thin handler. Runs on the event loop."""

    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    @handle_errors
    async def Recommend(self, request: recommend_pb2.RecommendRequest, context) -> recommend_pb2.RecommendResponse:
        rec = await self._recommender.recommend(request, timeout_s=context.time_remaining())
        resp = recommend_pb2.RecommendResponse(
            request_id=rec.request_id, version=rec.version, shard_map_version=rec.shard_map_version
        )
        for pos, item, score in zip(rec.positions.tolist(), rec.item_ids.tolist(), rec.scores.tolist()):
            resp.items.add(item_id=item, score=score, position=pos)
        return resp


class FrontendAdminServicer(recommend_pb2_grpc.FrontendAdminServicer):
    """Counters of the batcher, feature prep and lookup step; with a cluster ``view``, also
    ``view_live_nodes`` (a gauge: shard nodes the frontend sees registered right now)."""

    def __init__(self, recommender: Recommender, view=None) -> None:
        self._recommender = recommender
        self._view = view

    @handle_errors
    async def GetStats(self, request, context) -> recommend_pb2.GetStatsResponse:
        counters = self._recommender.counters()
        if self._view is not None:
            counters["view_live_nodes"] = len(self._view.nodes)
        return recommend_pb2.GetStatsResponse(counters=counters, version=self._recommender.version)
