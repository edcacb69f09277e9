from services._proto.shardrec.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_SUM: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
POOLING_UNSPECIFIED: Pooling
POOLING_SUM: Pooling
POOLING_MEAN: Pooling
POOLING_MAX: Pooling

class BagGroup(_message.Message):
    __slots__ = ("table", "partition", "pooling", "ids", "lengths", "weights")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    partition: int
    pooling: Pooling
    ids: _tensor_pb2.Tensor
    lengths: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    def __init__(self, table: _Optional[str] = ..., partition: _Optional[int] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., lengths: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("request_id", "version", "shard_map_version", "groups", "output_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version: int
    shard_map_version: int
    groups: _containers.RepeatedCompositeFieldContainer[BagGroup]
    output_dtype: _tensor_pb2.DType
    def __init__(self, request_id: _Optional[str] = ..., version: _Optional[int] = ..., shard_map_version: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[BagGroup, _Mapping]]] = ..., output_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class PooledGroup(_message.Message):
    __slots__ = ("pooled", "counts")
    POOLED_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    pooled: _tensor_pb2.Tensor
    counts: _tensor_pb2.Tensor
    def __init__(self, pooled: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., counts: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("version", "shard_map_version", "results")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    shard_map_version: int
    results: _containers.RepeatedCompositeFieldContainer[PooledGroup]
    def __init__(self, version: _Optional[int] = ..., shard_map_version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[PooledGroup, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PartitionInfo(_message.Message):
    __slots__ = ("table", "partition", "num_partitions", "rows", "size_bytes", "lookups", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    partition: int
    num_partitions: int
    rows: int
    size_bytes: int
    lookups: int
    ids: int
    def __init__(self, table: _Optional[str] = ..., partition: _Optional[int] = ..., num_partitions: _Optional[int] = ..., rows: _Optional[int] = ..., size_bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., ids: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node_id", "versions_ready", "serving_version", "shard_map_version", "partitions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_READY_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    versions_ready: _containers.RepeatedScalarFieldContainer[int]
    serving_version: int
    shard_map_version: int
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionInfo]
    def __init__(self, node_id: _Optional[str] = ..., versions_ready: _Optional[_Iterable[int]] = ..., serving_version: _Optional[int] = ..., shard_map_version: _Optional[int] = ..., partitions: _Optional[_Iterable[_Union[PartitionInfo, _Mapping]]] = ...) -> None: ...
