"""The placement planner (pure): shapes, memory, load balance, few moves, diff and summarize."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Callable

import numpy as np
import pytest

from services.core.errors import ConfigError, PlanError
from services.core.placement import (
    REPLICAS_ALL,
    Move,
    MoveKind,
    NodeCapacity,
    NodeSummary,
    PlannerConfig,
    ShardMap,
    TableLoad,
    TablePlacement,
    TablePlacementSpec,
    diff,
    plan,
    summarize,
)
from services.core.types import PartitionKey, ShardingType, TableSpec

KIB, MIB = 1 << 10, 1 << 20
RW, REP, TW = ShardingType.ROW_WISE, ShardingType.REPLICATED, ShardingType.TABLE_WISE


def _nodes(n: int, memory_bytes: int) -> list[NodeCapacity]:
    return [NodeCapacity(f"shard-{i}", memory_bytes) for i in range(n)]


def _check(smap: ShardMap, tables: list[TableLoad], nodes: list[NodeCapacity], config: PlannerConfig) -> dict[str, NodeSummary]:
    """Every produced map: valid for the tables, within every node's memory, min_replicas kept."""
    smap.validate({t.spec.name: t.spec.rows for t in tables})
    assert smap.nodes == tuple(n.node_id for n in nodes)
    summary = summarize(smap, tables)
    for node in nodes:
        assert summary[node.node_id].memory_bytes <= node.memory_bytes, node
    want = min(config.min_replicas, len(nodes))
    for t in tables:
        if t.pinned is None:
            assert all(len(r) >= want for r in smap.tables[t.spec.name].partitions), t.spec.name
    return summary


def _power_law_cluster(
    num_tables: int, num_nodes: int, seed: int, *, memory_slack: float = 1.6, rows_max: int = 50_000_000, zipf: float = 1.1
) -> tuple[list[TableLoad], list[NodeCapacity]]:
    """Made-up tables: rows log-uniform in [1k, rows_max], dim 16..256, lookups/s ~ 1/rank^zipf
    (ranks shuffled, so hot is not big); node memory = memory_slack x two copies of every table."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(num_tables) + 1
    tables = [
        TableLoad(
            TableSpec(f"t{i:04d}", int(1000 * (rows_max / 1000) ** rng.random()), int(rng.choice([16, 32, 64, 128, 256]))),
            1e6 / float(ranks[i]) ** zipf,
        )
        for i in range(num_tables)
    ]
    total = sum(t.spec.size_bytes for t in tables)
    return tables, _nodes(num_nodes, int(2 * total * memory_slack / num_nodes))


# ---- shapes: replicated, table_wise, row_wise, pins -------------------------------------------

# 64 KiB small tables, 1.25 MiB mid tables, a 12.2 MiB big one; 1,000 lookups/s in all, so on 4
# nodes a unit should carry at most 0.2 x 250 = 50 lookups/s.
SMALL_HOT = TableSpec("small_hot", 1000, 16)
SMALL_COLD = TableSpec("small_cold", 1000, 16)
MID = TableSpec("mid", 20_000, 16)
MID_HOT = TableSpec("mid_hot", 20_000, 16)
BIG = TableSpec("big", 200_000, 16)
LOADS = {SMALL_HOT: 400.0, SMALL_COLD: 10.0, MID: 40.0, MID_HOT: 300.0, BIG: 250.0}
CONFIG = PlannerConfig(replicate_max_bytes=1 * MIB, max_partition_bytes=4 * MIB)


def _mix(
    pins: dict[str, TablePlacementSpec] | None = None, scale: float = 1.0, lookups: dict[TableSpec, float] | None = None
) -> list[TableLoad]:
    """LOADS x scale, with ``lookups`` replacing some tables' loads and ``pins`` by table name."""
    return [TableLoad(spec, (lookups or {}).get(spec, load * scale), (pins or {}).get(spec.name)) for spec, load in LOADS.items()]


SHAPE_CASES = [
    # (id, tables, nodes, config, {table: (sharding, partitions, replicas)})
    (
        "rules on 4 nodes",
        _mix(),
        _nodes(4, 64 * MIB),
        CONFIG,
        {
            "small_hot": (REP, 1, 4),  # 400 lookups/s: 8 units wanted, capped at 4 nodes
            "small_cold": (REP, 1, 2),  # min_replicas
            "mid": (TW, 1, 2),  # too big to replicate, cool enough for one partition
            "mid_hot": (RW, 3, 2),  # 300 / (50 x 2 replicas) -> 3 partitions by load
            "big": (RW, 4, 2),  # 12.2 MiB / 4 MiB -> 4 partitions by memory
        },
    ),
    (
        "no load: sizes alone decide",
        _mix(scale=0.0),
        _nodes(4, 64 * MIB),
        CONFIG,
        {"small_hot": (REP, 1, 2), "small_cold": (REP, 1, 2), "mid": (TW, 1, 2), "mid_hot": (TW, 1, 2), "big": (RW, 4, 2)},
    ),
    (
        "one node: one replica, no split by load",
        _mix(),
        _nodes(1, 64 * MIB),
        CONFIG,
        {"small_hot": (REP, 1, 1), "small_cold": (REP, 1, 1), "mid": (TW, 1, 1), "mid_hot": (TW, 1, 1), "big": (RW, 4, 1)},
    ),
    (
        "min_replicas 3",
        _mix(),
        _nodes(5, 64 * MIB),
        dataclasses.replace(CONFIG, min_replicas=3),
        {"small_hot": (REP, 1, 5), "small_cold": (REP, 1, 3), "mid": (TW, 1, 3), "mid_hot": (RW, 3, 3), "big": (RW, 4, 3)},
    ),
    (
        "max_partition_bytes defaults to node memory / 4",
        _mix(),
        _nodes(4, 16 * MIB),
        dataclasses.replace(CONFIG, max_partition_bytes=None),
        {"big": (RW, 4, 2), "mid": (TW, 1, 2)},
    ),
    (
        "pins respected exactly",
        _mix(
            {
                "small_hot": TablePlacementSpec(TW, 1, 1),
                "big": TablePlacementSpec(RW, 2, REPLICAS_ALL),  # partitions over max_partition_bytes: the pin wins
                "mid": TablePlacementSpec(REP, 1, REPLICAS_ALL),
                "mid_hot": TablePlacementSpec(RW, 5, 1),
            }
        ),
        _nodes(4, 64 * MIB),
        CONFIG,
        {"small_hot": (TW, 1, 1), "big": (RW, 2, 4), "mid": (REP, 1, 4), "mid_hot": (RW, 5, 1), "small_cold": (REP, 1, 2)},
    ),
]


@pytest.mark.parametrize("tables,nodes,config,expected", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
def test_shapes(tables: list[TableLoad], nodes: list[NodeCapacity], config: PlannerConfig, expected: dict) -> None:
    smap = plan(tables, nodes, None, config, version=3)
    assert smap.version == 3
    _check(smap, tables, nodes, config)
    for name, (sharding, parts, replicas) in expected.items():
        tp = smap.tables[name]
        assert (tp.sharding, tp.num_partitions, {len(r) for r in tp.partitions}) == (sharding, parts, {replicas}), name
        limit = config.max_partition_bytes or sorted(n.memory_bytes for n in nodes)[(len(nodes) - 1) // 2] // 4
        table = next(t for t in tables if t.spec.name == name)
        if sharding is RW and table.pinned is None:
            assert -(-table.spec.rows // parts) * table.spec.dim * 4 <= limit, name  # the biggest partition fits


KEEP_CASES = [
    # (id, changed tables, changed config, table, its new (sharding, P, R), its moves as {kind: count})
    (
        "a cooled replicated table keeps its replicas",
        _mix(lookups={SMALL_HOT: 10.0}),
        CONFIG,
        "small_hot",
        (REP, 1, 4),
        {},
    ),
    (
        "a cooled row_wise table keeps its partitions",
        _mix(lookups={MID_HOT: 50.0}),
        CONFIG,
        "mid_hot",
        (RW, 3, 2),
        {},
    ),
    (
        "replicated over replicate_max_bytes: table_wise, extra replicas dropped",
        _mix(lookups={SMALL_HOT: 40.0}),
        dataclasses.replace(CONFIG, replicate_max_bytes=32 * KIB),
        "small_hot",
        (TW, 1, 2),
        {MoveKind.DROP: 2},
    ),
    (
        "partitions over a lowered max_partition_bytes: cut again",
        _mix(),
        dataclasses.replace(CONFIG, max_partition_bytes=2 * MIB),
        "big",
        (RW, 7, 2),
        {MoveKind.DROP: 8, MoveKind.ADD: 14},
    ),
]


@pytest.mark.parametrize("tables,config,name,shape,moves", [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES])
def test_current_shape_kept_while_acceptable(
    tables: list[TableLoad], config: PlannerConfig, name: str, shape: tuple, moves: dict
) -> None:
    nodes = _nodes(4, 64 * MIB)
    old = plan(_mix(), nodes, None, CONFIG, version=1)
    new = plan(tables, nodes, old, config, version=2)
    _check(new, tables, nodes, config)
    tp = new.tables[name]
    assert (tp.sharding, tp.num_partitions, {len(r) for r in tp.partitions}) == (shape[0], shape[1], {shape[2]})
    kinds = Counter(m.kind for m in diff(old, new, list(LOADS)) if m.table == name)
    assert kinds == moves


# ---- errors name the table and the shortfall --------------------------------------------------

T = TableSpec("t", 50_000, 16)  # 3.05 MiB

ERROR_CASES = [
    # (id, tables, nodes, config, fragments the message must contain)
    (
        "a pinned table bigger than any node",
        [TableLoad(T, 1.0, TablePlacementSpec(TW))],
        _nodes(3, 2 * MIB),
        CONFIG,
        ["'t' partition 0", "3200000 B", "short by 1102848 B"],
    ),
    (
        "the cluster is short of memory",
        [TableLoad(BIG, 1.0)],
        _nodes(4, 5 * MIB),  # 2 copies of 12.2 MiB do not fit 20 MiB
        CONFIG,
        ["'big'", "short by", "all tables need 25600000 B, the nodes have 20971520 B"],
    ),
    (
        "replicas need distinct nodes",
        [TableLoad(T, 1.0, TablePlacementSpec(TW, 1, 3))],
        [NodeCapacity("a", 4 * MIB), NodeCapacity("b", 4 * MIB), NodeCapacity("c", 1 * MIB)],
        CONFIG,
        ["'t' partition 0", "'c' with 1048576 B", "short by"],
    ),
    ("pin: more replicas than nodes", [TableLoad(T, 1.0, TablePlacementSpec(RW, 2, 5))], _nodes(4, MIB), CONFIG, ["'t'", "5 replicas", "4 nodes"]),
    (
        "pin: more partitions than rows",
        [TableLoad(TableSpec("tiny", 5, 4), 1.0, TablePlacementSpec(RW, 10))],
        _nodes(2, MIB),
        CONFIG,
        ["'tiny'", "rows=5"],
    ),
    (
        "a row bigger than max_partition_bytes",
        [TableLoad(TableSpec("wide", 10_000, 1024), 1.0)],
        _nodes(2, 64 * MIB),
        dataclasses.replace(CONFIG, max_partition_bytes=1000),
        ["'wide'", "one row is 4096 B"],
    ),
    ("no nodes", [TableLoad(T, 1.0)], [], CONFIG, ["at least 1 node"]),
    ("node ids repeat", [TableLoad(T, 1.0)], [NodeCapacity("a", MIB), NodeCapacity("a", MIB)], CONFIG, ["unique", "'a'"]),
    ("table names repeat", [TableLoad(T, 1.0), TableLoad(T, 2.0)], _nodes(2, 64 * MIB), CONFIG, ["repeated", "'t'"]),
    ("negative load", [TableLoad(T, -1.0)], _nodes(2, 64 * MIB), CONFIG, ["'t'", "lookups_per_s"]),
]


@pytest.mark.parametrize("tables,nodes,config,fragments", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_plan_errors(tables: list[TableLoad], nodes: list[NodeCapacity], config: PlannerConfig, fragments: list[str]) -> None:
    with pytest.raises(PlanError) as info:
        plan(tables, nodes, None, config, version=1)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.grpc_code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [({"min_replicas": 0}, "min_replicas"), ({"load_tolerance": 0.0}, "load_tolerance"), ({"max_partition_bytes": 0}, "max_partition_bytes"),
     ({"replicate_max_bytes": -1}, "replicate_max_bytes"), ({"keep_shape_load_factor": 0.5}, "keep_shape_load_factor")],
    ids=["min_replicas", "load_tolerance", "max_partition_bytes", "replicate_max_bytes", "keep_shape_load_factor"],
)  # fmt: skip
def test_config_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PlannerConfig(**{"replicate_max_bytes": 0, **kwargs})


# ---- load balance under skewed (power-law) loads ----------------------------------------------

BALANCE_CASES = [
    # (id, tables, nodes, seed, zipf exponent, load_tolerance, memory slack)
    ("60 tables on 10 nodes", 60, 10, 1, 1.1, 0.2, 1.6),
    ("200 tables on 16 nodes, tight tolerance", 200, 16, 2, 1.1, 0.05, 1.6),
    ("very skewed: one table has most of the load", 100, 12, 3, 2.0, 0.2, 1.6),
    ("few tables, many nodes", 8, 20, 4, 1.1, 0.2, 3.0),
    ("memory nearly full", 150, 12, 6, 1.1, 0.2, 1.05),
    ("2% spare memory", 300, 40, 5, 1.1, 0.2, 1.02),
]


@pytest.mark.parametrize("num_tables,num_nodes,seed,zipf,tol,slack", [c[1:] for c in BALANCE_CASES], ids=[c[0] for c in BALANCE_CASES])
def test_load_balance(num_tables: int, num_nodes: int, seed: int, zipf: float, tol: float, slack: float) -> None:
    tables, nodes = _power_law_cluster(num_tables, num_nodes, seed, memory_slack=slack, zipf=zipf)
    config = PlannerConfig(replicate_max_bytes=64 * MIB, load_tolerance=tol)
    summary = _check(plan(tables, nodes, None, config, version=1), tables, nodes, config)
    loads = np.array([s.lookups_per_s for s in summary.values()])
    assert loads.sum() == pytest.approx(sum(t.lookups_per_s for t in tables))
    assert loads.max() / loads.mean() <= 1 + tol + 1e-9, loads / loads.mean()


# ---- few moves ---------------------------------------------------------------------------------

MOVES_CONFIG = PlannerConfig(replicate_max_bytes=64 * MIB)
Changed = tuple[list[TableLoad], list[NodeCapacity]]
Change = Callable[[list[TableLoad], list[NodeCapacity], ShardMap], Changed]  # a change to the inputs
Expect = Callable[[ShardMap, ShardMap, list[Move], list[TableLoad]], None]  # old, new, moves, new tables


def _add_node(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    return tables, nodes + [NodeCapacity("shard-new", nodes[0].memory_bytes)]


def _remove_node(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    return tables, [n for n in nodes if n.node_id != "shard-3"]


def _shrink_node(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    """shard-2 keeps room for half of what it holds."""
    held = summarize(old, tables)["shard-2"].memory_bytes
    return tables, [NodeCapacity(n.node_id, held // 2) if n.node_id == "shard-2" else n for n in nodes]


def _coldest(tables: list[TableLoad], old: ShardMap, sharding: ShardingType) -> str:
    return min((t for t in tables if old.tables[t.spec.name].sharding is sharding), key=lambda t: (t.lookups_per_s, t.spec.name)).spec.name


def _pin(tables: list[TableLoad], name: str, pin: TablePlacementSpec) -> list[TableLoad]:
    return [dataclasses.replace(t, pinned=pin) if t.spec.name == name else t for t in tables]


def _pin_replicated_to_row_wise(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    return _pin(tables, _coldest(tables, old, REP), TablePlacementSpec(RW, 2, 2)), nodes


def _pin_row_wise_to_replicated(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    return _pin(tables, _coldest(tables, old, RW), TablePlacementSpec(REP, 1, 2)), nodes


def _one_table_warmer(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    """The hottest table gets 20% more lookups: within tolerance, nothing reshapes."""
    hottest = max(tables, key=lambda t: t.lookups_per_s).spec.name
    return [dataclasses.replace(t, lookups_per_s=t.lookups_per_s * 1.2) if t.spec.name == hottest else t for t in tables], nodes


def _add_table(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    return tables + [TableLoad(TableSpec("zz_new", 5000, 32), 1.0)], nodes


def _drop_table(tables: list[TableLoad], nodes: list[NodeCapacity], old: ShardMap) -> Changed:
    coldest = min(tables, key=lambda t: t.lookups_per_s)
    return [t for t in tables if t is not coldest], nodes


def _moved(moves: list[Move]) -> set[tuple[str, int]]:
    return {(m.table, m.partition) for m in moves}


def _held_by(smap: ShardMap, node: str) -> set[tuple[str, int]]:
    return {(k.table, k.partition) for k in smap.partitions_of(node)}


def _expect_nothing(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
    assert moves == []
    assert new.tables == old.tables


def _expect_toward_new_node(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
    adds = [m for m in moves if m.kind is MoveKind.ADD]
    drops = [m for m in moves if m.kind is MoveKind.DROP]
    assert {m.node_id for m in adds} == {"shard-new"}
    assert "shard-new" not in {m.node_id for m in drops}
    units = sum(len(r) for tp in old.tables.values() for r in tp.partitions)
    fair_share = units / len(new.nodes)
    print(f"\nnode added: {len(adds)} adds, {len(drops)} drops ({units} units, fair share {fair_share:.1f})")
    assert 1 <= len(adds) <= fair_share
    assert len(drops) <= len(adds)
    loads = {n: s.lookups_per_s for n, s in summarize(new, tables).items()}
    mean = sum(loads.values()) / len(loads)
    assert loads["shard-new"] >= (1 - MOVES_CONFIG.load_tolerance) * mean  # the new node takes its share


def _expect_only_node(node: str) -> Expect:
    def check(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
        assert _moved(moves) <= _held_by(old, node)
        assert {m.node_id for m in moves if m.kind is MoveKind.DROP} == {node}
        assert node not in {m.node_id for m in moves if m.kind is MoveKind.ADD}
        print(f"\n{len(moves)} moves, {node} held {len(_held_by(old, node))} partitions")

    return check


def _expect_only_pinned(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
    """Only the pinned table moves, but for units that must make room for it: dropped from a
    node that receives the pinned table, and placed again elsewhere."""
    (pinned,) = [t for t in tables if t.pinned is not None]
    name, pin = pinned.spec.name, pinned.pinned
    tp = new.tables[name]
    assert (tp.sharding, tp.num_partitions, {len(r) for r in tp.partitions}) == (pin.sharding, pin.partitions, {pin.replicas})
    assert {(m.kind, m.partition) for m in moves if m.table == name} >= {(MoveKind.DROP, 0), (MoveKind.ADD, 0)}
    receivers = {m.node_id for m in moves if m.table == name and m.kind is MoveKind.ADD}
    others = [m for m in moves if m.table != name]
    assert {m.node_id for m in others if m.kind is MoveKind.DROP} <= receivers
    made_room = {(m.table, m.partition) for m in others if m.kind is MoveKind.DROP}
    assert {(m.table, m.partition) for m in others if m.kind is MoveKind.ADD} == made_room
    print(f"\n{len(moves) - len(others)} moves of {name!r}, {len(others)} to make room for it")
    assert len(made_room) <= 2 * len(receivers)


def _expect_same_shapes(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
    assert {n: (tp.sharding, tp.num_partitions) for n, tp in new.tables.items()} == {
        n: (tp.sharding, tp.num_partitions) for n, tp in old.tables.items()
    }
    print(f"\n{len(moves)} moves")
    assert len(moves) <= 8


def _expect_only_table(name_of: Callable[[ShardMap, ShardMap], str]) -> Expect:
    def check(old: ShardMap, new: ShardMap, moves: list[Move], tables: list[TableLoad]) -> None:
        assert {m.table for m in moves} == {name_of(old, new)}

    return check


MOVE_CASES = [
    # (id, change, expectation)
    ("same inputs", lambda tables, nodes, old: (tables, nodes), _expect_nothing),
    ("one node added", _add_node, _expect_toward_new_node),
    ("one node removed", _remove_node, _expect_only_node("shard-3")),
    ("one node over memory", _shrink_node, _expect_only_node("shard-2")),
    ("pin: replicated -> row_wise", _pin_replicated_to_row_wise, _expect_only_pinned),
    ("pin: row_wise -> replicated", _pin_row_wise_to_replicated, _expect_only_pinned),
    ("hottest table 20% warmer", _one_table_warmer, _expect_same_shapes),
    ("table added", _add_table, _expect_only_table(lambda old, new: "zz_new")),
    ("table dropped", _drop_table, _expect_only_table(lambda old, new: (set(old.tables) - set(new.tables)).pop())),
]


@pytest.mark.parametrize("change,expect", [c[1:] for c in MOVE_CASES], ids=[c[0] for c in MOVE_CASES])
@pytest.mark.parametrize("num_tables,num_nodes,seed", [(80, 12, 11), (300, 30, 12)], ids=["80x12", "300x30"])
def test_few_moves(num_tables: int, num_nodes: int, seed: int, change: Change, expect: Expect) -> None:
    tables, nodes = _power_law_cluster(num_tables, num_nodes, seed)
    old = plan(tables, nodes, None, MOVES_CONFIG, version=1)
    tables2, nodes2 = change(tables, nodes, old)
    new = plan(tables2, nodes2, old, MOVES_CONFIG, version=2)
    _check(new, tables2, nodes2, MOVES_CONFIG)
    moves = diff(old, new, list({t.spec.name: t.spec for t in tables + tables2}.values()))
    _assert_round_trip(old, new, moves)
    expect(old, new, moves, tables2)


# ---- determinism -------------------------------------------------------------------------------


def test_deterministic() -> None:
    tables, nodes = _power_law_cluster(120, 10, seed=21)
    config = PlannerConfig(replicate_max_bytes=64 * MIB)
    a = plan(tables, nodes, None, config, version=1)
    assert plan(list(reversed(tables)), nodes, None, config, version=1) == a
    nodes2 = nodes[1:] + [NodeCapacity("shard-new", nodes[0].memory_bytes)]
    b = plan(tables, nodes2, a, config, version=2)
    assert plan(list(reversed(tables)), nodes2, a, config, version=2) == b


# ---- diff and summarize ------------------------------------------------------------------------


def _map(tables: dict, nodes: tuple[str, ...] = ("a", "b", "c"), version: int = 1) -> ShardMap:
    return ShardMap(
        version=version,
        nodes=tuple(nodes),
        tables={n: TablePlacement(s, tuple(tuple(r) for r in parts)) for n, (s, parts) in tables.items()},
    )


def _assert_round_trip(old: ShardMap, new: ShardMap, moves: list[Move]) -> None:
    """Applying the moves to old's (table, partition, node) assignments gives new's."""
    held = {(name, p, node) for name, tp in old.tables.items() for p, r in enumerate(tp.partitions) for node in r}
    for m in moves:
        if m.kind is MoveKind.DROP:
            held.remove((m.table, m.partition, m.node_id))
    for m in moves:
        if m.kind is MoveKind.ADD:
            assert (m.table, m.partition, m.node_id) not in held
            held.add((m.table, m.partition, m.node_id))
    assert held == {(name, p, node) for name, tp in new.tables.items() for p, r in enumerate(tp.partitions) for node in r}


U, R2 = TableSpec("u", 10, 4), TableSpec("r", 3, 4)  # 16 B a row

DIFF_CASES = [
    # (id, old tables, new tables, expected moves as (table, partition, kind, node, bytes, P))
    ("equal", {"u": (RW, [["a"], ["b"]])}, {"u": (RW, [["a"], ["b"]])}, []),
    (
        "a replica moves, another is added",
        {"u": (RW, [["a"], ["b"]]), "r": (REP, [["a", "b"]])},
        {"u": (RW, [["c"], ["b"]]), "r": (REP, [["a", "b", "c"]])},
        [("r", 0, "add", "c", 48, 1), ("u", 0, "add", "c", 80, 2), ("u", 0, "drop", "a", 80, 2)],
    ),
    (
        "P changes: everything of the table moves, same node or not",
        {"u": (RW, [["a"], ["b"]])},
        {"u": (RW, [["a"], ["b"], ["c"]])},
        [("u", 0, "add", "a", 64, 3), ("u", 1, "add", "b", 48, 3), ("u", 2, "add", "c", 48, 3),
         ("u", 0, "drop", "a", 80, 2), ("u", 1, "drop", "b", 80, 2)],
    ),
    (
        "sharding label changes, P does not: only replicas move",
        {"r": (TW, [["a"]])},
        {"r": (REP, [["a", "b"]])},
        [("r", 0, "add", "b", 48, 1)],
    ),
    ("table added and dropped", {"u": (TW, [["a"]])}, {"r": (TW, [["b"]])}, [("r", 0, "add", "b", 48, 1), ("u", 0, "drop", "a", 160, 1)]),
]  # fmt: skip


@pytest.mark.parametrize("old,new,expected", [c[1:] for c in DIFF_CASES], ids=[c[0] for c in DIFF_CASES])
def test_diff(old: dict, new: dict, expected: list[tuple]) -> None:
    old_map, new_map = _map(old), _map(new, version=2)
    moves = diff(old_map, new_map, [U, R2])
    assert [(m.table, m.partition, m.kind.value, m.node_id, m.size_bytes, m.num_partitions) for m in moves] == expected
    _assert_round_trip(old_map, new_map, moves)


def test_diff_and_summarize_need_every_table() -> None:
    with pytest.raises(PlanError, match="'u'.*diff"):
        diff(_map({"u": (TW, [["a"]])}), _map({}), [R2])
    with pytest.raises(PlanError, match="'u'.*summarize"):
        summarize(_map({"u": (TW, [["a"]])}), [TableLoad(R2, 1.0)])


def test_summarize() -> None:
    smap = _map({"u": (RW, [["a"], ["b", "c"]]), "r": (REP, [["a", "b"]])})
    got = summarize(smap, [TableLoad(U, 100.0), TableLoad(R2, 10.0)])
    assert got == {
        "a": NodeSummary("a", (PartitionKey("r", 0), PartitionKey("u", 0)), 48 + 80, 5.0 + 50.0),
        "b": NodeSummary("b", (PartitionKey("r", 0), PartitionKey("u", 1)), 48 + 80, 5.0 + 25.0),
        "c": NodeSummary("c", (PartitionKey("u", 1),), 80, 25.0),
    }


# ---- scale -------------------------------------------------------------------------------------


def test_scale_1000_tables_200_nodes() -> None:
    """Made-up sizes (rows 1k..50M log-uniform, dim 16..256) and Zipf loads. The time is
    printed, not asserted."""
    tables, nodes = _power_law_cluster(1000, 200, seed=7)
    config = PlannerConfig(replicate_max_bytes=64 * MIB)
    start = time.perf_counter()
    smap = plan(tables, nodes, None, config, version=1)
    first_s = time.perf_counter() - start
    summary = _check(smap, tables, nodes, config)
    start = time.perf_counter()
    grown = nodes + [NodeCapacity("shard-new", nodes[0].memory_bytes)]
    again = plan(tables, grown, smap, config, version=2)
    replan_s = time.perf_counter() - start
    _check(again, tables, grown, config)
    loads = np.array([s.lookups_per_s for s in summary.values()])
    memory = np.array([s.memory_bytes for s in summary.values()])
    units = sum(len(r) for tp in smap.tables.values() for r in tp.partitions)
    print(
        f"\n1,000 tables x 200 nodes: plan {first_s:.2f} s, replan with a node added {replan_s:.2f} s "
        f"({len(diff(smap, again, [t.spec for t in tables]))} moves); {units} units; "
        f"lookups max/mean {loads.max() / loads.mean():.3f}, memory max/mean {memory.max() / memory.mean():.3f}"
    )
    assert loads.max() / loads.mean() <= 1 + config.load_tolerance
