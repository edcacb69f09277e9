"""``shardrec.v1.EmbeddingShard``: decode, make one call into the TableStore, encode.

A Lookup is checked in the order that keeps a bad request cheap (docs/overload.md, "Shard
Lookup limits"): the body is parsed here (``core.lookup_request``: its arrays stay views of the
request's bytes; a malformed one is INVALID_ARGUMENT), then every group's declared shapes, then
the caps on ids, bags and answer size over all groups (nothing copied yet), then each group's
arrays; only then does the store pool.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from google.protobuf.message import DecodeError

from services._proto.shardrec.v1 import embedding_pb2, tensor_pb2
from services.core import wire
from services.core.errors import InvalidArgumentError
from services.core.lookup_request import RawGroup, parse_lookup_request
from services.core.placement import partition_rows
from services.core.rpc.errors import handle_errors
from services.core.types import PoolingType
from services.embedding_shard.limits import MAX_ABS_WEIGHT, DeclaredGroup, LookupLimits
from services.embedding_shard.observe import LookupObserver, LookupScope
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore

_POOLING = {
    embedding_pb2.POOLING_SUM: PoolingType.SUM,
    embedding_pb2.POOLING_MEAN: PoolingType.MEAN,
    embedding_pb2.POOLING_MAX: PoolingType.MAX,
}
_OUTPUT = {tensor_pb2.DTYPE_UNSPECIFIED: np.float32, tensor_pb2.DTYPE_FLOAT32: np.float32, tensor_pb2.DTYPE_FLOAT16: np.float16}


def parse(message_type, payload: bytes):  # noqa: ANN001, ANN201 - a generated message class
    """``payload`` parsed as ``message_type``; INVALID_ARGUMENT "malformed <Message>: ..." when
    it is not one."""
    try:
        return message_type.FromString(payload)
    except DecodeError as e:
        raise InvalidArgumentError(f"malformed {message_type.DESCRIPTOR.name}: {e}") from None


def declare_group(group: RawGroup, index: int) -> DeclaredGroup:
    """One group's pooling and declared shapes (dtype, rank, no negative size, as many weights
    as ids), without reading its arrays; errors name the group's table and the bad value."""
    where = f"groups[{index}] (table {group.table!r} partition {group.partition})"
    pooling = _POOLING.get(group.pooling)
    if pooling is None:
        raise InvalidArgumentError(f"{where}: pooling must be SUM, MEAN or MAX, got {group.pooling}")
    (ids,) = wire.declared_shape(group.ids, f"{where}.ids", dtype="int64", ndim=1)
    (bags,) = wire.declared_shape(group.lengths, f"{where}.lengths", dtype="int32", ndim=1)
    weighted = wire.is_set(group.weights)
    if weighted:
        (weights,) = wire.declared_shape(group.weights, f"{where}.weights", dtype="float32", ndim=1)
        if weights != ids:
            raise InvalidArgumentError(f"{where}.weights: {weights} weights for {ids} ids")
        if pooling is not PoolingType.SUM:
            raise InvalidArgumentError(f"{where}: per-id weights need SUM pooling, got {pooling.value}")
    return DeclaredGroup(group.table, group.partition, pooling, ids, bags, weighted)


def decode_group(group: RawGroup, declared: DeclaredGroup, index: int) -> BagGroup:
    """One group's arrays (its shapes declared and checked): bytes that match the shapes, bag
    lengths that add up to the ids, finite weights within +-MAX_ABS_WEIGHT."""
    where = declared.where(index)
    ids = wire.decode(group.ids, f"{where}.ids", dtype="int64", ndim=1)
    lengths = wire.decode(group.lengths, f"{where}.lengths", dtype="int32", ndim=1)
    if len(lengths) and int(lengths.min()) < 0:
        raise InvalidArgumentError(f"{where}.lengths: negative bag length {int(lengths.min())}")
    total = int(lengths.sum(dtype=np.int64))
    if total != len(ids):
        raise InvalidArgumentError(f"{where}: lengths add up to {total} but {len(ids)} ids were sent")
    weights = None
    if declared.weighted:
        weights = wire.decode(group.weights, f"{where}.weights", dtype="float32", ndim=1)
        peak = float(np.abs(weights).max()) if len(weights) else 0.0  # NaN and inf propagate
        if not np.isfinite(peak):
            raise InvalidArgumentError(f"{where}.weights: non-finite weight")
        if peak > MAX_ABS_WEIGHT:
            raise InvalidArgumentError(f"{where}.weights: |weight| {peak:g} is over the limit of {MAX_ABS_WEIGHT:g}")
    return BagGroup(declared.table, declared.partition, declared.pooling, ids, lengths, weights)


class EmbeddingShardServicer:
    """Thin handler over one TableStore. Called from the server's thread pool; its methods take
    the serialized request (``add_to_server`` registers them with a passthrough deserializer,
    so a malformed body is answered here, as INVALID_ARGUMENT)."""

    def __init__(self, node_id: str, store: TableStore, *, limits: LookupLimits, map_version: Callable[[], int],
                 observer: LookupObserver | None = None) -> None:
        self._node_id = node_id
        self._store = store
        self._limits = limits
        self._map_version = map_version
        self._dims = {name: spec.dim for name, spec in store.specs.items()}
        self._obs = observer or LookupObserver.off(node_id)

    @handle_errors
    def Lookup(self, payload: bytes, context) -> bytes:
        """Answers the serialized LookupResponse (written by ``wire.encode_lookup_response``),
        observed (``observe.LookupObserver``: its span, latency by status code, failure line)."""
        with self._obs.lookup(context.invocation_metadata(), len(payload)) as scope:
            answer = self._lookup(payload, scope)
            scope.answered(len(answer))
            return answer

    def _lookup(self, payload: bytes, scope: LookupScope) -> bytes:
        request = parse_lookup_request(payload)
        out_dtype = _OUTPUT.get(request.output_dtype)
        if out_dtype is None:
            raise InvalidArgumentError(f"output_dtype must be FLOAT32 or FLOAT16, got {request.output_dtype}")
        self._limits.check_groups(len(request.groups))  # before any per-group work
        declared = [declare_group(group, i) for i, group in enumerate(request.groups)]
        self._limits.check(declared, self._dims, np.dtype(out_dtype).itemsize)
        groups = [decode_group(group, d, i) for i, (group, d) in enumerate(zip(request.groups, declared))]
        # Any map version is served while the rows are held (a rebalance moves partitions while
        # frontends route with the previous or the next map); 0 = the caller routes by this
        # node's layout, so a partition or id that does not fit it is the caller's error.
        scope.groups(groups)
        with scope.pooling():
            pooled = self._store.lookup(groups, version=request.version, map_version=request.shard_map_version, out_dtype=out_dtype)
        return wire.encode_lookup_response(pooled.version, self._map_version(), pooled.results)

    @handle_errors
    def Describe(self, payload: bytes, context) -> embedding_pb2.DescribeResponse:
        parse(embedding_pb2.DescribeRequest, payload)
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
    """Register ``servicer`` under ``shardrec.v1.EmbeddingShard`` with requests handed over as
    bytes (parsed by the servicer, so a malformed body is its INVALID_ARGUMENT, not gRPC's) and
    Lookup answering bytes it serialized itself (one copy of the pooled vectors, not three)."""
    import grpc

    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, request_deserializer=_passthrough, response_serializer=_passthrough,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=_passthrough,
            response_serializer=embedding_pb2.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shardrec.v1.EmbeddingShard", handlers),))
