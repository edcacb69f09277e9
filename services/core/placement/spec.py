"""The placement spec: per table its sharding, partitions and replicas, read from a JSON or TOML
file (format in docs/placement.md). Pure: no torch, no grpc.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.errors import ConfigError
from services.core.types import ShardingType

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
