"""ShardMap: which node holds which partition of which table (immutable, versioned), the only
source of ownership, and the sizes that follow from it (row r of a table with P partitions is
in partition ``r % P``). See docs/placement.md. Pure: no torch, no grpc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from services.core.errors import ConfigError
from services.core.types import PartitionId, PartitionKey, ShardingType, TableSpec


@dataclass(frozen=True)
class TablePlacement:
    """One table: its sharding type and, per partition, the node ids of its replicas."""

    sharding: ShardingType
    partitions: tuple[tuple[str, ...], ...]

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)


@dataclass(frozen=True)
class ShardMap:
    """table -> partitions -> replicas, at ``version`` (bumped on every change)."""

    version: int
    tables: dict[str, TablePlacement]
    nodes: tuple[str, ...]

    def partitions_of(self, node_id: str) -> tuple[PartitionKey, ...]:
        """Every partition this node owns, sorted by table then partition."""
        out = []
        for table in sorted(self.tables):
            for p, replicas in enumerate(self.tables[table].partitions):
                if node_id in replicas:
                    out.append(PartitionKey(table, p))
        return tuple(out)

    def partition_ids_of(self, node_id: str) -> tuple[PartitionId, ...]:
        """``partitions_of`` with each table's P: what the node must hold for this map."""
        return tuple(PartitionId(k.table, k.partition, self.num_partitions(k.table)) for k in self.partitions_of(node_id))

    def partition_ids(self) -> tuple[PartitionId, ...]:
        """Every partition of the map, sorted by table then partition."""
        return tuple(
            PartitionId(name, p, self.tables[name].num_partitions)
            for name in sorted(self.tables)
            for p in range(self.tables[name].num_partitions)
        )

    def replicas(self, key: PartitionKey) -> tuple[str, ...]:
        return self.tables[key.table].partitions[key.partition]

    def num_partitions(self, table: str) -> int:
        return self.tables[table].num_partitions

    def validate(self, table_rows: dict[str, int] | None = None) -> None:
        """Raise ConfigError when the map is inconsistent (optionally against the model's tables)."""
        if self.version < 1:
            raise ConfigError(f"shard map version must be >= 1, got {self.version}")
        known = set(self.nodes)
        for name, tp in self.tables.items():
            if tp.num_partitions < 1:
                raise ConfigError(f"table {name!r}: no partitions")
            if tp.sharding is not ShardingType.ROW_WISE and tp.num_partitions != 1:
                raise ConfigError(f"table {name!r}: {tp.sharding.value} needs exactly 1 partition")
            if tp.sharding is ShardingType.ROW_WISE and tp.num_partitions < 2:
                raise ConfigError(f"table {name!r}: row_wise needs 2 or more partitions")
            for p, replicas in enumerate(tp.partitions):
                if not replicas:
                    raise ConfigError(f"table {name!r} partition {p}: no replica")
                if len(set(replicas)) != len(replicas):
                    raise ConfigError(f"table {name!r} partition {p}: a node appears twice")
                unknown = set(replicas) - known
                if unknown:
                    raise ConfigError(f"table {name!r} partition {p}: unknown nodes {sorted(unknown)}")
        if table_rows is not None:
            missing = set(table_rows) - set(self.tables)
            extra = set(self.tables) - set(table_rows)
            if missing or extra:
                raise ConfigError(f"shard map tables differ from the model: missing {sorted(missing)}, extra {sorted(extra)}")
            for name, rows in table_rows.items():
                if self.tables[name].num_partitions > rows:
                    raise ConfigError(f"table {name!r}: more partitions than rows ({rows})")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nodes": list(self.nodes),
            "tables": {
                name: {"sharding": tp.sharding.value, "partitions": [list(r) for r in tp.partitions]}
                for name, tp in sorted(self.tables.items())
            },
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardMap":
        try:
            smap = cls(
                version=int(d["version"]),
                nodes=tuple(str(n) for n in d["nodes"]),
                tables={
                    str(name): TablePlacement(
                        ShardingType(t["sharding"]), tuple(tuple(str(n) for n in r) for r in t["partitions"])
                    )
                    for name, t in d["tables"].items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed shard map: {e!r}") from e
        smap.validate()
        return smap

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardMap":
        try:
            return cls.from_json(json.loads(data))
        except ValueError as e:
            raise ConfigError(f"shard map is not valid JSON: {e}") from e


def node_ids(n: int) -> tuple[str, ...]:
    """The shard node ids of an n-node cluster: ``shard-0 .. shard-{n-1}``."""
    if n < 1:
        raise ConfigError(f"a cluster needs at least 1 node, got {n}")
    return tuple(f"shard-{i}" for i in range(n))


def partition_rows(rows: int, num_partitions: int, partition: int) -> int:
    """How many rows partition ``partition`` of a table holds (row r is in partition r % P)."""
    return (rows - partition + num_partitions - 1) // num_partitions


def partition_bytes(table: TableSpec, num_partitions: int, partition: int) -> int:
    return partition_rows(table.rows, num_partitions, partition) * (table.size_bytes // max(table.rows, 1))


def owned_partitions(node_id: str, *maps: "ShardMap | None") -> frozenset[PartitionId]:
    """What a node must hold: its partitions in every map given (the active map and, during a
    rebalance, the target map). None entries are skipped."""
    return frozenset(pid for smap in maps if smap is not None for pid in smap.partition_ids_of(node_id))


def bytes_per_node(smap: ShardMap, tables: Sequence[TableSpec]) -> dict[str, int]:
    """Embedding bytes each node of ``smap`` holds (every node listed, 0 when it holds nothing)."""
    by_name = {t.name: t for t in tables}
    out = {n: 0 for n in smap.nodes}
    for name, tp in smap.tables.items():
        table = by_name[name]
        for p, replicas in enumerate(tp.partitions):
            size = partition_bytes(table, tp.num_partitions, p)
            for node in replicas:
                out[node] = out.get(node, 0) + size
    return out
