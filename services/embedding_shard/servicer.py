"""``shardrec.v1.EmbeddingShard``: decode, make one call into the TableStore, encode."""

from __future__ import annotations

import numpy as np

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2
from services.core import wire
from services.core.errors import InvalidArgumentError, ResourceExhaustedError
from services.core.placement import partition_rows
from services.core.rpc.errors import handle_errors
from services.core.types import PoolingType
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore

_POOLING = {
    embedding_pb2.POOLING_SUM: PoolingType.SUM,
    embedding_pb2.POOLING_MEAN: PoolingType.MEAN,
    embedding_pb2.POOLING_MAX: PoolingType.MAX,
}


def decode_group(group: embedding_pb2.BagGroup, index: int) -> BagGroup:
    """Validate one bag group's arrays; errors name the group's table and the bad value."""
    where = f"groups[{index}] (table {group.table!r} partition {group.partition})"
    pooling = _POOLING.get(group.pooling)
    if pooling is None:
        raise InvalidArgumentError(f"{where}: pooling must be SUM, MEAN or MAX, got {group.pooling}")
    ids = wire.decode(group.ids, f"{where}.ids", dtype="int64", ndim=1)
    lengths = wire.decode(group.lengths, f"{where}.lengths", dtype="int32", ndim=1)
    if len(lengths) and int(lengths.min()) < 0:
        raise InvalidArgumentError(f"{where}.lengths: negative bag length {int(lengths.min())}")
    total = int(lengths.sum(dtype=np.int64))
    if total != len(ids):
        raise InvalidArgumentError(f"{where}: lengths add up to {total} but {len(ids)} ids were sent")
    weights = None
    if wire.is_set(group.weights):
        weights = wire.decode(group.weights, f"{where}.weights", dtype="float32", ndim=1)
        if len(weights) != len(ids):
            raise InvalidArgumentError(f"{where}.weights: {len(weights)} weights for {len(ids)} ids")
        if not np.isfinite(weights).all():
            raise InvalidArgumentError(f"{where}.weights: non-finite weight")
        if pooling is not PoolingType.SUM:
            raise InvalidArgumentError(f"{where}: per-id weights need SUM pooling, got {pooling.value}")
    return BagGroup(group.table, group.partition, pooling, ids, lengths, weights)


class EmbeddingShardServicer(embedding_pb2_grpc.EmbeddingShardServicer):
    """Thin handler over one TableStore. Called from the server's thread pool."""

    def __init__(self, node_id: str, store: TableStore, *, max_ids_per_request: int, map_version: "callable") -> None:
        self._node_id = node_id
        self._store = store
        self._max_ids = max_ids_per_request
        self._map_version = map_version

    @handle_errors
    def Lookup(self, request: embedding_pb2.LookupRequest, context) -> bytes:
        """Answers the serialized LookupResponse (written by ``wire.encode_lookup_response``)."""
        total_ids = sum(g.ids.dims[0].size if len(g.ids.dims) == 1 else 0 for g in request.groups)
        if total_ids > self._max_ids:
            raise ResourceExhaustedError(f"request carries {total_ids} ids, over this node's cap of {self._max_ids}")
        if request.output_dtype not in (tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16):
            raise InvalidArgumentError(f"output_dtype must be FLOAT32 or FLOAT16, got {request.output_dtype}")
        out_dtype = np.float16 if request.output_dtype == tensor_pb2.DTYPE_FLOAT16 else np.float32
        groups = [decode_group(group, i) for i, group in enumerate(request.groups)]
        # Any map version is served while the rows are held (a rebalance moves partitions while
        # frontends route with the previous or the next map); 0 = the caller routes by this
        # node's layout, so a partition or id that does not fit it is the caller's error.
        pooled = self._store.lookup(groups, version=request.version, map_version=request.shard_map_version, out_dtype=out_dtype)
        return wire.encode_lookup_response(pooled.version, self._map_version(), pooled.results)

    @handle_errors
    def Describe(self, request: embedding_pb2.DescribeRequest, context) -> embedding_pb2.DescribeResponse:
        resp = embedding_pb2.DescribeResponse(
            node_id=self._node_id,
            versions_ready=self._store.versions_ready,
            serving_version=self._store.serving_version,
            shard_map_version=self._map_version(),
        )
        for pid, part in sorted(self._store.partitions().items(), key=lambda kv: str(kv[0])):
            resp.partitions.add(
                table=pid.table,
                partition=pid.partition,
                num_partitions=pid.num_partitions,
                rows=partition_rows(part.spec.rows, pid.num_partitions, pid.partition),
                size_bytes=self._store.size_bytes(pid),
                lookups=part.lookups,
                ids=part.ids,
            )
        return resp


def _passthrough(payload: bytes) -> bytes:
    return payload


def add_to_server(servicer: EmbeddingShardServicer, server) -> None:
    """Register ``servicer`` like the generated ``add_EmbeddingShardServicer_to_server``, except
    that Lookup answers bytes it serialized itself (one copy of the pooled vectors, not three)."""
    import grpc

    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup,
            request_deserializer=embedding_pb2.LookupRequest.FromString,
            response_serializer=_passthrough,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=embedding_pb2.DescribeRequest.FromString,
            response_serializer=embedding_pb2.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shardrec.v1.EmbeddingShard", handlers),))
