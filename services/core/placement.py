"""ShardMap: which node holds which partition of which table (immutable, versioned).

Ownership comes only from the ShardMap; a node's ZooKeeper znode says only that it is alive and
what it has ready. Row r of a table with P partitions lives in partition ``r % P`` at local row
``r // P`` (power-law hot ids, which are the low ids, spread over every partition).

Pure module: no torch, no grpc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.core.errors import ConfigError
from services.core.types import PartitionKey, ShardingType


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
