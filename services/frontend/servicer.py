"""``shardrec.v1.Recommender`` and ``FrontendAdmin``: decode, one call into the ``Recommender``,
encode. Errors become statuses in ``services.core.rpc.errors``."""

from __future__ import annotations


from google.protobuf.message import DecodeError

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.errors import InvalidArgumentError
from services.core.metrics import LEGACY_GAUGES, frontend_stats
from services.core.rpc.auth import current_caller
from services.core.rpc.errors import handle_errors
from services.core.tracing import extract
from services.frontend.batch import Recommendation
from services.frontend.recommender import ANONYMOUS, Recommender
from services.frontend.validate import clean_request_id

# The caller identity per-caller limits apply to; trusted as sent while authentication is off
# (with tokens on, the token's caller: ``services.core.rpc.auth.current_caller``).
CALLER_KEY = "x-shardrec-caller"


def caller_of(metadata) -> str:
    """The ``x-shardrec-caller`` identity of a call (printable ASCII), else ``anonymous``."""
    for key, value in metadata or ():
        if key == CALLER_KEY and isinstance(value, str):
            return clean_request_id(value) or ANONYMOUS
    return ANONYMOUS


def parse_request(raw: bytes) -> recommend_pb2.RecommendRequest:
    """A RecommendRequest from its wire bytes; INVALID_ARGUMENT (no class names) when malformed."""
    try:
        return recommend_pb2.RecommendRequest.FromString(raw)
    except DecodeError as e:
        raise InvalidArgumentError(f"malformed RecommendRequest ({len(raw)} bytes): {e}") from None


class RecommenderServicer(recommend_pb2_grpc.RecommenderServicer):
    """Thin handler. Runs on the event loop."""

    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    @handle_errors
    async def Recommend(self, request: bytes, context) -> recommend_pb2.RecommendResponse:
        metadata = context.invocation_metadata()
        caller = current_caller() or caller_of(metadata)
        rec = await self._recommender.recommend(
            parse_request(request), timeout_s=context.time_remaining(), caller=caller, parent=extract(metadata)
        )
        return to_response(rec)


def to_response(rec: Recommendation) -> recommend_pb2.RecommendResponse:
    """The RecommendResponse of one answer (gRPC and the REST endpoint alike)."""
    resp = recommend_pb2.RecommendResponse(
        request_id=rec.request_id,
        version=rec.version,
        shard_map_version=rec.shard_map_version,
        degraded=bool(rec.degraded_reasons),
        degraded_reasons=rec.degraded_reasons,
    )
    for pos, item, score in zip(rec.positions.tolist(), rec.item_ids.tolist(), rec.scores.tolist()):
        resp.items.add(item_id=item, score=score, position=pos)
    return resp


def add_recommender_to_server(servicer: RecommenderServicer, server) -> None:
    """Register ``servicer`` like the generated ``add_RecommenderServicer_to_server``, except
    that requests reach it as bytes, so a malformed body is INVALID_ARGUMENT, not UNKNOWN."""
    import grpc

    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Recommend,
        request_deserializer=None,
        response_serializer=recommend_pb2.RecommendResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shardrec.v1.Recommender", {"Recommend": handler}),))


class FrontendAdminServicer(recommend_pb2_grpc.FrontendAdminServicer):
    """Counters and gauges of admission, the batcher, feature prep and the lookup step, read
    from the process's Prometheus ``registry`` (``core.metrics.frontend_stats``)."""

    def __init__(self, registry) -> None:
        self._registry = registry

    @handle_errors
    async def GetStats(self, request, context) -> recommend_pb2.GetStatsResponse:
        counters, gauges = frontend_stats(self._registry)
        legacy = {k: int(round(gauges[k])) for k in LEGACY_GAUGES if k in gauges}  # older readers
        return recommend_pb2.GetStatsResponse(
            counters={**counters, **legacy},
            gauges=gauges,
            version=int(gauges["model_version"]),
            shard_map_version=int(gauges["shard_map_version"]),
        )
