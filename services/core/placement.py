"""ShardMap: which node holds which partition of which table (immutable, versioned).

Ownership comes only from the ShardMap; a node's ZooKeeper znode says only that it is alive and
what it has ready. Row r of a table with P partitions lives in partition ``r % P`` at local row
``r // P`` (power-law hot ids, which are the low ids, spread over every partition).

Pure module: no torch, no grpc.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
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


# --------------------------------------------------------------------------------------------
# Initial placement: a spec file (per table: sharding, partitions, replicas) -> ShardMap.
# See docs/placement.md for the file format.
# --------------------------------------------------------------------------------------------

REPLICAS_ALL = "all"
_SPEC_KEYS = frozenset({"sharding", "partitions", "replicas"})


@dataclass(frozen=True)
class TablePlacementSpec:
    """How one table is placed: ``sharding``, ``partitions`` (row_wise only, >= 2) and
    ``replicas`` (an int >= 1, or ``"all"``: every node; replicated defaults to "all", the
    others to 1)."""

    sharding: ShardingType
    partitions: int = 1
    replicas: int | str = 1

    def resolve_replicas(self, num_nodes: int) -> int:
        return num_nodes if self.replicas == REPLICAS_ALL else int(self.replicas)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sharding": self.sharding.value, "replicas": self.replicas}
        if self.sharding is ShardingType.ROW_WISE:
            d["partitions"] = self.partitions
        return d

    @classmethod
    def from_json(cls, where: str, d: Any) -> "TablePlacementSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"placement spec {where}: must be an object, got {d!r}")
        unknown = set(d) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"placement spec {where}: unknown keys {sorted(unknown)} (known: {sorted(_SPEC_KEYS)})")
        try:
            sharding = ShardingType(d.get("sharding", ShardingType.TABLE_WISE.value))
        except ValueError:
            raise ConfigError(
                f"placement spec {where}: sharding must be one of {[s.value for s in ShardingType]}, "
                f"got {d.get('sharding')!r}"
            ) from None
        replicas = d.get("replicas", REPLICAS_ALL if sharding is ShardingType.REPLICATED else 1)
        if replicas != REPLICAS_ALL and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
            raise ConfigError(f"placement spec {where}: replicas must be an integer >= 1 or \"all\", got {replicas!r}")
        if sharding is ShardingType.REPLICATED and replicas != REPLICAS_ALL and replicas < 2:
            raise ConfigError(f"placement spec {where}: replicated needs replicas >= 2 or \"all\" (use table_wise)")
        partitions = d.get("partitions")
        if sharding is ShardingType.ROW_WISE:
            if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 2:
                raise ConfigError(f"placement spec {where}: row_wise needs partitions >= 2, got {partitions!r}")
        elif partitions not in (None, 1):
            raise ConfigError(f"placement spec {where}: {sharding.value} has exactly 1 partition, got {partitions!r}")
        return cls(sharding, partitions if sharding is ShardingType.ROW_WISE else 1, replicas)


@dataclass(frozen=True)
class PlacementSpec:
    """Per table how it is placed; ``default`` covers tables not listed in ``tables``."""

    default: TablePlacementSpec = TablePlacementSpec(ShardingType.TABLE_WISE)
    tables: dict[str, TablePlacementSpec] = field(default_factory=dict)

    def for_table(self, name: str) -> TablePlacementSpec:
        return self.tables.get(name, self.default)

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default.to_json(), "tables": {n: e.to_json() for n, e in sorted(self.tables.items())}}

    @classmethod
    def from_json(cls, d: Any) -> "PlacementSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"placement spec must be an object, got {type(d).__name__}")
        unknown = set(d) - {"default", "tables"}
        if unknown:
            raise ConfigError(f"placement spec: unknown keys {sorted(unknown)} (known: ['default', 'tables'])")
        default = TablePlacementSpec.from_json("default", d["default"]) if "default" in d else cls.default
        tables_d = d.get("tables", {})
        if not isinstance(tables_d, dict):
            raise ConfigError("placement spec: tables must be an object of table name -> entry")
        tables = {str(n): TablePlacementSpec.from_json(f"table {n!r}", e) for n, e in tables_d.items()}
        return cls(default, tables)


def load_placement_spec(path: str | os.PathLike[str]) -> PlacementSpec:
    """Read a placement spec from a ``.json`` or ``.toml`` file (same structure)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read placement spec {p}: {e}") from e
    try:
        if p.suffix.lower() == ".toml":
            d = tomllib.loads(raw.decode())
        else:
            d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"placement spec {p} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {e}") from e
    try:
        return PlacementSpec.from_json(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e


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


def initial_shard_map(
    spec: PlacementSpec,
    tables: Sequence[TableSpec],
    node_ids: Sequence[str],
    version: int = 1,
) -> ShardMap:
    """The first ShardMap of a cluster: pure and deterministic.

    Partitions are placed biggest first (ties: table name, then partition); each replica goes
    to the node with the fewest bytes so far among the nodes not yet holding that partition
    (ties go to the earlier node in ``node_ids``). Raises ConfigError naming the table when
    the spec names an unknown table, asks for more replicas than nodes, or row_wise partitions
    outside ``[2, rows]``. This is the planner with every table pinned by ``spec``
    (``services.core.planner.plan_from_spec``).
    """
    from services.core.planner import plan_from_spec  # the planner imports this module

    return plan_from_spec(spec, tables, node_ids, version)
