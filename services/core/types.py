"""The vocabulary of shardrec: tables, features, pooling, placement, versions.

Pure module: imports neither torch nor grpc, so the CLI and the planner stay light.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A model version: a positive, monotonically increasing integer (``versions/<N>/``).
Version = int


class PoolingType(str, enum.Enum):
    """How the rows of one bag are reduced to one vector."""

    SUM = "sum"
    MEAN = "mean"
    MAX = "max"


class ShardingType(str, enum.Enum):
    """How one table is placed on shard nodes (P partitions x R replicas).

    - TABLE_WISE: P = 1, the whole table on one node group (R usually 1).
    - REPLICATED: P = 1, the whole table on several nodes; a bag is pooled in one RPC.
    - ROW_WISE: P > 1, row r lives in partition ``r % P`` at local row ``r // P``.
    """

    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    REPLICATED = "replicated"


class FeatureSide(str, enum.Enum):
    """Whose feature it is: looked up once per request (USER) or once per candidate (ITEM)."""

    USER = "user"
    ITEM = "item"


class MappingKind(str, enum.Enum):
    """How a raw categorical value becomes a table row.

    - IDENTITY: the value is the row; a value outside ``[0, rows)`` is rejected
      (INVALID_ARGUMENT naming the feature and value).
    - MODULO: the row is ``value mod rows`` (hashed vocabularies); every int64 maps to a row,
      negative values included.
    """

    IDENTITY = "identity"
    MODULO = "modulo"


class FeatureSource(str, enum.Enum):
    """Where a sparse feature's raw values come from.

    - STORED: the stored user / item feature row (Redis), overridable by the request.
    - ENTITY_ID: the entity's own id: the request's user id (user side) or the candidate's
      item id (item side); a bag of exactly one value.
    """

    STORED = "stored"
    ENTITY_ID = "entity_id"


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: ``rows`` x ``dim`` values of ``dtype``."""

    name: str
    rows: int
    dim: int
    dtype: str = "float32"

    @property
    def size_bytes(self) -> int:
        return self.rows * self.dim * 4


@dataclass(frozen=True)
class SparseFeatureSpec:
    """A categorical feature: a bag of values mapped to rows of ``table`` and pooled.

    ``max_bag_len`` caps how many values one request may give (longer bags are rejected).
    """

    name: str
    table: str
    side: FeatureSide
    pooling: PoolingType
    max_bag_len: int = 1
    mapping: MappingKind = MappingKind.IDENTITY
    source: FeatureSource = FeatureSource.STORED


@dataclass(frozen=True)
class DenseFeatureSpec:
    """A float feature of the user or item, with the value used when nothing is stored."""

    name: str
    side: FeatureSide
    default: float = 0.0


@dataclass(frozen=True)
class DenseArch:
    """DLRM dense architecture.

    bottom MLP: ``num_dense -> bottom_mlp[...]`` (last size == embedding dim), pairwise dot
    interaction over the bottom output and the F pooled sparse features, top MLP:
    ``dim + (F+1)F/2 -> top_mlp[...]`` (last size 1), score = sigmoid(logit).
    """

    num_dense: int
    embedding_dim: int
    num_sparse: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]

    @property
    def interaction_dim(self) -> int:
        n = self.num_sparse + 1
        return self.embedding_dim + n * (n - 1) // 2

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of every dense weight, as ``services.core.dense.DLRM`` names them."""
        shapes: dict[str, tuple[int, ...]] = {}
        for prefix, sizes, width in (
            ("bottom_mlp", self.bottom_mlp, self.num_dense),
            ("top_mlp", self.top_mlp, self.interaction_dim),
        ):
            for i, out in enumerate(sizes):
                shapes[f"{prefix}.{2 * i}.weight"] = (out, width)
                shapes[f"{prefix}.{2 * i}.bias"] = (out,)
                width = out
        return shapes


@dataclass(frozen=True)
class PartitionKey:
    """One partition of one table: ``table/partition``."""

    table: str
    partition: int

    def __str__(self) -> str:
        return f"{self.table}/{self.partition}"

    @classmethod
    def parse(cls, text: str) -> "PartitionKey":
        table, _, part = text.rpartition("/")
        return cls(table, int(part))


@dataclass(frozen=True)
class PartitionId:
    """One partition of a table split in ``num_partitions`` (P): what a shard holds.

    Within one ShardMap a PartitionKey is enough (the map fixes P); a shard following two maps
    during a rebalance that changes a table's P may hold ``items/0of2`` and ``items/0of1`` at
    once, different rows under the same key. Written ``table/<partition>of<P>``.
    """

    table: str
    partition: int
    num_partitions: int

    @property
    def key(self) -> PartitionKey:
        return PartitionKey(self.table, self.partition)

    def __str__(self) -> str:
        return f"{self.table}/{self.partition}of{self.num_partitions}"

    @classmethod
    def parse(cls, text: str) -> "PartitionId":
        """``"items/1of2"`` -> PartitionId("items", 1, 2); ValueError when malformed."""
        table, _, rest = text.rpartition("/")
        part, sep, num = rest.partition("of")
        if not table or not sep:
            raise ValueError(f"not a partition id (table/<partition>of<P>): {text!r}")
        pid = cls(table, int(part), int(num))
        if not 0 <= pid.partition < pid.num_partitions:
            raise ValueError(f"partition {pid.partition} outside [0, {pid.num_partitions}) in {text!r}")
        return pid
