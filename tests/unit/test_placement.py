"""Initial placement (pure): spec parsing, initial_shard_map, and the ShardMap contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from services.core.placement import (
    PlacementSpec,
    ShardMap,
    TablePlacement,
    bytes_per_node,
    initial_shard_map,
    load_placement_spec,
    node_ids,
    partition_rows,
)
from services.core.types import PartitionKey, ShardingType, TableSpec

REPO_ROOT = Path(__file__).resolve().parents[2]

TABLES = (
    TableSpec("users", 1000, 16),
    TableSpec("items", 600, 16),
    TableSpec("tags", 100, 16),
    TableSpec("countries", 20, 16),
    TableSpec("devices", 3, 16),
)

BRIEF_SPEC = {
    "default": {"sharding": "replicated", "replicas": 2},
    "tables": {
        "users": {"sharding": "row_wise", "partitions": 2, "replicas": 1},
        "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
        "tags": {"sharding": "table_wise"},
    },
}


def _spec(d: dict) -> PlacementSpec:
    return PlacementSpec.from_json(d)


# ---- initial_shard_map: shapes ---------------------------------------------------------------

SHAPE_CASES = [
    # (id, spec, nodes, {table: (sharding, partitions, replicas)})
    (
        "brief example, 3 nodes",
        BRIEF_SPEC,
        3,
        {
            "users": ("row_wise", 2, 1),
            "items": ("row_wise", 2, 2),
            "tags": ("table_wise", 1, 1),
            "countries": ("replicated", 1, 2),
            "devices": ("replicated", 1, 2),
        },
    ),
    (
        "everything replicated on all",
        {"default": {"sharding": "replicated", "replicas": "all"}},
        4,
        {t.name: ("replicated", 1, 4) for t in TABLES},
    ),
    (
        "replicated defaults to all",
        {"default": {"sharding": "replicated"}},
        2,
        {t.name: ("replicated", 1, 2) for t in TABLES},
    ),
    (
        "empty spec: table_wise, one replica",
        {},
        2,
        {t.name: ("table_wise", 1, 1) for t in TABLES},
    ),
    (
        "row_wise with partitions == rows",
        {"tables": {"devices": {"sharding": "row_wise", "partitions": 3}}},
        3,
        {"devices": ("row_wise", 3, 1), "users": ("table_wise", 1, 1)},
    ),
    (
        "single node",
        {"default": {"sharding": "replicated", "replicas": "all"}, "tables": {"users": {"sharding": "row_wise", "partitions": 4}}},
        1,
        {"users": ("row_wise", 4, 1), "tags": ("replicated", 1, 1)},
    ),
    (
        "table_wise with replicas",
        {"default": {"sharding": "table_wise", "replicas": 3}},
        3,
        {t.name: ("table_wise", 1, 3) for t in TABLES},
    ),
]


@pytest.mark.parametrize("spec,n,expected", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
def test_initial_shard_map_shapes(spec: dict, n: int, expected: dict) -> None:
    smap = initial_shard_map(_spec(spec), TABLES, node_ids(n))
    assert smap.version == 1
    assert smap.nodes == node_ids(n)
    assert set(smap.tables) == {t.name for t in TABLES}
    for name, (sharding, parts, replicas) in expected.items():
        tp = smap.tables[name]
        assert tp.sharding is ShardingType(sharding), name
        assert tp.num_partitions == parts, name
        assert all(len(r) == replicas for r in tp.partitions), name
    # No node twice in one partition, every node known, the map is valid and round-trips.
    for tp in smap.tables.values():
        for replicas in tp.partitions:
            assert len(set(replicas)) == len(replicas)
            assert set(replicas) <= set(smap.nodes)
    smap.validate({t.name: t.rows for t in TABLES})
    assert ShardMap.from_bytes(smap.to_bytes()) == smap


def test_replicated_all_is_on_every_node() -> None:
    smap = initial_shard_map(_spec({"default": {"sharding": "replicated", "replicas": "all"}}), TABLES, node_ids(3))
    for node in smap.nodes:
        assert smap.partitions_of(node) == tuple(PartitionKey(t, 0) for t in sorted(smap.tables))


def test_deterministic() -> None:
    a = initial_shard_map(_spec(BRIEF_SPEC), TABLES, node_ids(3))
    b = initial_shard_map(_spec(BRIEF_SPEC), tuple(reversed(TABLES)), node_ids(3))
    assert a == b


def test_version_is_passed_through() -> None:
    assert initial_shard_map(_spec({}), TABLES, node_ids(2), version=7).version == 7


# ---- memory balance ------------------------------------------------------------------------

BALANCE_CASES = [
    # (id, tables, spec, nodes, max allowed (max - min) / max)
    ("equal tables, table_wise", tuple(TableSpec(f"t{i}", 100, 8) for i in range(6)), {}, 3, 0.0),
    ("row_wise spreads one big table", (TableSpec("big", 3000, 8),), {"default": {"sharding": "row_wise", "partitions": 3}}, 3, 0.0),
    (
        "big row_wise + small ones",
        (TableSpec("big", 9000, 8), TableSpec("a", 500, 8), TableSpec("b", 400, 8), TableSpec("c", 300, 8)),
        {"tables": {"big": {"sharding": "row_wise", "partitions": 6, "replicas": 2}}},
        4,
        0.15,
    ),
    ("brief spec", TABLES, BRIEF_SPEC, 3, 0.35),
]


@pytest.mark.parametrize(
    "tables,spec,n,max_imbalance", [c[1:] for c in BALANCE_CASES], ids=[c[0] for c in BALANCE_CASES]
)
def test_memory_balance(tables: tuple[TableSpec, ...], spec: dict, n: int, max_imbalance: float) -> None:
    smap = initial_shard_map(_spec(spec), tables, node_ids(n))
    sizes = bytes_per_node(smap, tables)
    total = sum(partition_rows(t.rows, smap.num_partitions(t.name), p) * t.dim * 4 * len(r)
                for t in tables for p, r in enumerate(smap.tables[t.name].partitions))  # fmt: skip
    assert sum(sizes.values()) == total
    hi, lo = max(sizes.values()), min(sizes.values())
    assert (hi - lo) / hi <= max_imbalance, sizes


def test_greedy_places_biggest_first_on_emptiest_node() -> None:
    tables = (TableSpec("small", 10, 4), TableSpec("big", 100, 4), TableSpec("mid", 50, 4))
    smap = initial_shard_map(_spec({}), tables, node_ids(2))
    # big -> shard-0 (tie: first node); mid -> shard-1 (emptiest); small -> shard-1 (200+40 < 400)
    assert smap.replicas(PartitionKey("big", 0)) == ("shard-0",)
    assert smap.replicas(PartitionKey("mid", 0)) == ("shard-1",)
    assert smap.replicas(PartitionKey("small", 0)) == ("shard-1",)


def test_partition_rows_cover_the_table() -> None:
    for rows in (1, 2, 7, 10, 1001):
        for parts in range(1, min(rows, 6) + 1):
            counts = [partition_rows(rows, parts, p) for p in range(parts)]
            assert sum(counts) == rows
            assert counts == [len(range(p, rows, parts)) for p in range(parts)]


# ---- errors name the table -------------------------------------------------------------------

ERROR_CASES = [
    # (id, spec, nodes, fragments the message must contain)
    ("replicas > nodes", {"tables": {"tags": {"sharding": "table_wise", "replicas": 3}}}, 2, ["'tags'", "3 replicas", "2 nodes"]),
    ("default replicas > nodes", {"default": {"sharding": "replicated", "replicas": 4}}, 3, ["replicas", "3 nodes"]),
    ("row_wise partitions > rows", {"tables": {"devices": {"sharding": "row_wise", "partitions": 4}}}, 2, ["'devices'", "rows=3"]),
    ("row_wise partitions < 2", {"tables": {"users": {"sharding": "row_wise", "partitions": 1}}}, 2, ["'users'", "partitions >= 2"]),
    ("row_wise without partitions", {"tables": {"users": {"sharding": "row_wise"}}}, 2, ["'users'", "partitions >= 2"]),
    ("unknown table", {"tables": {"nope": {"sharding": "table_wise"}}}, 2, ["nope", "does not have"]),
    ("unknown sharding", {"tables": {"users": {"sharding": "column_wise"}}}, 2, ["'users'", "column_wise"]),
    ("unknown key", {"tables": {"users": {"sharding": "table_wise", "replica": 2}}}, 2, ["'users'", "replica"]),
    ("partitions on table_wise", {"tables": {"tags": {"sharding": "table_wise", "partitions": 2}}}, 2, ["'tags'", "exactly 1 partition"]),
    ("replicas 0", {"tables": {"tags": {"sharding": "table_wise", "replicas": 0}}}, 2, ["'tags'", "replicas"]),
    ("replicated with 1 replica", {"tables": {"tags": {"sharding": "replicated", "replicas": 1}}}, 2, ["'tags'", "table_wise"]),
    ("unknown top-level key", {"defaults": {}}, 2, ["defaults"]),
]


@pytest.mark.parametrize("spec,n,fragments", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_initial_shard_map_errors(spec: dict, n: int, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        initial_shard_map(_spec(spec), TABLES, node_ids(n))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_node_ids() -> None:
    assert node_ids(3) == ("shard-0", "shard-1", "shard-2")
    with pytest.raises(ConfigError):
        node_ids(0)


# ---- spec files ------------------------------------------------------------------------------


def test_load_spec_json_and_toml_agree(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps(BRIEF_SPEC))
    (tmp_path / "spec.toml").write_text(
        '[default]\nsharding = "replicated"\nreplicas = 2\n\n'
        '[tables.users]\nsharding = "row_wise"\npartitions = 2\nreplicas = 1\n\n'
        '[tables.items]\nsharding = "row_wise"\npartitions = 2\nreplicas = 2\n\n'
        '[tables.tags]\nsharding = "table_wise"\n'
    )
    assert load_placement_spec(tmp_path / "spec.json") == load_placement_spec(tmp_path / "spec.toml") == _spec(BRIEF_SPEC)


def test_load_spec_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_placement_spec(bad)
    with pytest.raises(ConfigError, match="missing.json"):
        load_placement_spec(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["mixed.json", "replicated.json", "row_wise.json"])
@pytest.mark.parametrize("nodes", [3])
def test_shipped_specs_place_the_demo_model(name: str, nodes: int) -> None:
    from services.core.synth import PRESETS, model_spec

    spec = load_placement_spec(REPO_ROOT / "deploy" / "placement" / name)
    for preset in PRESETS:
        tables = model_spec(preset).tables
        smap = initial_shard_map(spec, tables, node_ids(nodes))
        smap.validate({t.name: t.rows for t in tables})
        assert all(bytes_per_node(smap, tables).values())  # every node holds something
    kinds = {tp.sharding for tp in initial_shard_map(spec, model_spec("small").tables, node_ids(nodes)).tables.values()}
    expected = {
        "mixed.json": set(ShardingType),
        "replicated.json": {ShardingType.REPLICATED},
        "row_wise.json": {ShardingType.ROW_WISE},
    }[name]
    assert kinds == expected


# ---- ShardMap contract -----------------------------------------------------------------------


def _map(tables: dict, nodes=("a", "b"), version=1) -> ShardMap:
    return ShardMap(
        version=version,
        nodes=tuple(nodes),
        tables={n: TablePlacement(ShardingType(s), tuple(tuple(r) for r in parts)) for n, (s, parts) in tables.items()},
    )


def test_shard_map_json_round_trip() -> None:
    smap = _map({"u": ("row_wise", [["a"], ["b", "a"]]), "t": ("table_wise", [["b"]]), "r": ("replicated", [["a", "b"]])}, version=5)
    assert ShardMap.from_bytes(smap.to_bytes()) == smap
    assert ShardMap.from_json(json.loads(smap.to_bytes())) == smap
    assert smap.partitions_of("a") == (PartitionKey("r", 0), PartitionKey("u", 0), PartitionKey("u", 1))


VALIDATE_CASES = [
    ("version 0", _map({"t": ("table_wise", [["a"]])}, version=0), None, "version"),
    ("no partitions", _map({"t": ("table_wise", [])}), None, "no partitions"),
    ("table_wise with 2 partitions", _map({"t": ("table_wise", [["a"], ["b"]])}), None, "exactly 1 partition"),
    ("row_wise with 1 partition", _map({"t": ("row_wise", [["a"]])}), None, "2 or more"),
    ("no replica", _map({"t": ("table_wise", [[]])}), None, "no replica"),
    ("node twice", _map({"t": ("replicated", [["a", "a"]])}), None, "twice"),
    ("unknown node", _map({"t": ("table_wise", [["z"]])}), None, "unknown nodes"),
    ("missing table", _map({"t": ("table_wise", [["a"]])}), {"t": 5, "u": 5}, "missing ['u']"),
    ("more partitions than rows", _map({"t": ("row_wise", [["a"], ["b"], ["a"]])}), {"t": 2}, "more partitions than rows"),
]


@pytest.mark.parametrize("smap,rows,fragment", [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES])
def test_shard_map_validate_errors(smap: ShardMap, rows: dict | None, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        smap.validate(rows)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"{}", b'{"version": 1, "nodes": ["a"], "tables": {"t": {"sharding": "bogus", "partitions": [["a"]]}}}',
     b'{"version": 1, "nodes": ["a"], "tables": {"t": {"sharding": "table_wise", "partitions": [["b"]]}}}'],
    ids=["not json", "empty object", "bad sharding", "unknown node"],
)  # fmt: skip
def test_shard_map_from_bytes_rejects(raw: bytes) -> None:
    with pytest.raises(ConfigError):
        ShardMap.from_bytes(raw)
