"""The pure parts of live rebalancing: what a plan request asks of the planner, the plan file,
and the progress of a move read from node znodes (and its progress line)."""

from __future__ import annotations

import pytest

from services.control.rebalance import progress_line
from services.core.discovery.records import FrontendRecord, HeldPartition, LoadError, NodeRecord, PartitionError
from services.core.errors import ConfigError
from services.core.placement import PlacementSpec, PlannerConfig, ShardMap, TablePlacementSpec, initial_shard_map, node_ids
from services.core.rebalance import (
    PlanRequest,
    RebalancePlan,
    kept_shape,
    measured_load,
    next_node_ids,
    plan_target,
    progress,
    required_versions,
)
from services.core.types import PartitionId, ShardingType, TableSpec

TABLES = [TableSpec("users", 2000, 16), TableSpec("items", 5000, 16), TableSpec("tags", 300, 16), TableSpec("countries", 20, 16)]
SPEC = {
    "default": {"sharding": "replicated", "replicas": "all"},
    "tables": {"users": {"sharding": "row_wise", "partitions": 2, "replicas": 2}, "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
               "tags": {"sharding": "table_wise", "replicas": 2}},
}
CONFIG = PlannerConfig(replicate_max_bytes=1 << 20)
MEMORY = 1 << 30
LOADS = {"users": 100.0, "items": 3000.0, "tags": 600.0, "countries": 100.0}
REPLICATED = TablePlacementSpec(ShardingType.REPLICATED, 1, "all")  # `--set TABLE=replicated`


def _current() -> ShardMap:
    return initial_shard_map(PlacementSpec.from_json(SPEC), TABLES, node_ids(3))


def test_kept_shape_keeps_p_and_r_and_every_node_for_a_table_on_every_node():
    smap = _current()
    assert kept_shape(smap, "items", 3) == TablePlacementSpec(ShardingType.ROW_WISE, 2, 2)
    assert kept_shape(smap, "countries", 4) == TablePlacementSpec(ShardingType.REPLICATED, 1, "all")
    assert kept_shape(smap, "tags", 1) == TablePlacementSpec(ShardingType.TABLE_WISE, 1, 1)


def test_next_node_ids_fill_gaps():
    assert next_node_ids(("shard-0", "shard-1", "shard-2"), 2) == ["shard-3", "shard-4"]
    assert next_node_ids(("shard-0", "shard-2"), 2) == ["shard-1", "shard-3"]


def test_nothing_to_plan_is_refused():
    with pytest.raises(ConfigError, match="nothing to plan"):
        PlanRequest()


def test_add_a_node_moves_load_to_it_and_keeps_every_shape():
    current = _current()
    new = plan_target(current, TABLES, LOADS, PlanRequest(add_nodes=1), node_memory_bytes=MEMORY, config=CONFIG)
    assert new.version == current.version + 1 and new.nodes == ("shard-0", "shard-1", "shard-2", "shard-3")
    assert new.partition_ids_of("shard-3"), "the new node got nothing"
    for name, tp in current.tables.items():
        assert new.tables[name].sharding is tp.sharding and new.tables[name].num_partitions == tp.num_partitions
    assert len(new.tables["countries"].partitions[0]) == 4  # on every node, as before


def test_remove_a_node_replaces_only_its_partitions():
    current = _current()
    new = plan_target(current, TABLES, LOADS, PlanRequest(remove_nodes=("shard-1",)), node_memory_bytes=MEMORY, config=CONFIG)
    assert new.nodes == ("shard-0", "shard-2") and not new.partition_ids_of("shard-1")
    for node in ("shard-0", "shard-2"):
        assert set(current.partition_ids_of(node)) <= set(new.partition_ids_of(node))
    with pytest.raises(ConfigError, match="--remove-node 'shard-9': not a node of the active map"):
        plan_target(current, TABLES, LOADS, PlanRequest(remove_nodes=("shard-9",)), node_memory_bytes=MEMORY, config=CONFIG)


def test_set_reshapes_one_table_and_leaves_the_others():
    current = _current()
    new = plan_target(current, TABLES, LOADS, PlanRequest(sets=(("items", REPLICATED),)), node_memory_bytes=MEMORY, config=CONFIG)
    assert new.tables["items"].sharding is ShardingType.REPLICATED and len(new.tables["items"].partitions[0]) == 3
    assert {n: current.tables[n] for n in ("users", "tags", "countries")} == {n: new.tables[n] for n in ("users", "tags", "countries")}
    with pytest.raises(ConfigError, match="--set 'nope': the model has no such table"):
        plan_target(current, TABLES, LOADS, PlanRequest(sets=(("nope", REPLICATED),)), node_memory_bytes=MEMORY, config=CONFIG)


def test_plan_file_round_trip(tmp_path):
    current = _current()
    plan = RebalancePlan("c1", current.version, current, PlanRequest(add_nodes=1).to_json(), "2026-01-01T00:00:00+00:00")
    plan.save(tmp_path / "p.json")
    assert RebalancePlan.load(tmp_path / "p.json") == plan
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="is not a rebalance plan"):
        RebalancePlan.load(tmp_path / "bad.json")


def test_measured_load_adds_every_partition_of_every_node():
    nodes = {
        "a": NodeRecord(held={"items/0of2": HeldPartition(ids_per_s=10.0), "users/0of1": HeldPartition(ids_per_s=1.5)}),
        "b": NodeRecord(held={"items/1of2": HeldPartition(ids_per_s=12.0), "items/0of1": HeldPartition(ids_per_s=3.0)}),
        "c": NodeRecord(),
    }
    assert measured_load(nodes) == {"items": 25.0, "users": 1.5}


@pytest.mark.parametrize("serving, target, frontends, nodes, want", [
    (1, 1, {}, {}, {1}),
    (1, 2, {"f": FrontendRecord(version=1)}, {"a": NodeRecord(versions_ready=(1,))}, {1}),  # nobody holds 2 yet
    (1, 2, {"f": FrontendRecord(version=1)}, {"a": NodeRecord(versions_ready=(1, 2))}, {1, 2}),  # frontends may switch any moment
    (1, 2, {}, {"a": NodeRecord(versions_ready=(1, 2)), "b": NodeRecord(load_error=LoadError(2))}, {1}),  # refused: never served
    (2, 2, {"f": FrontendRecord(version=1), "g": FrontendRecord(version=2)}, {}, {1, 2}),
])
def test_required_versions(serving, target, frontends, nodes, want):
    assert required_versions(serving, target, frontends, nodes) == frozenset(want)


def _node(held, versions=(1,), **extra):
    return NodeRecord(held={p: HeldPartition(size_bytes=1) for p in held}, versions_ready=tuple(versions), **extra)


def test_progress_is_done_only_when_every_load_is_held_at_every_required_version():
    active = _current()
    target = plan_target(active, TABLES, {}, PlanRequest(sets=(("users", REPLICATED),)), node_memory_bytes=MEMORY, config=CONFIG)
    held = {n: [str(p) for p in active.partition_ids_of(n)] for n in active.nodes}
    users = "users/0of1"
    nodes = {
        "shard-0": _node(held["shard-0"] + [users]),
        "shard-1": _node(held["shard-1"], partitions_loading=(users,)),
        # shard-2 is down
    }
    p = progress(active, target, TABLES, nodes, frozenset({1}))
    states = {a.node_id: a.state for a in p.adds}
    assert states == {"shard-0": "ready", "shard-1": "loading", "shard-2": "down"}
    assert not p.done and p.partitions_ready == p.partitions_total  # users/0of1 has a ready replica already
    assert p.bytes_total == 3 * 2000 * 16 * 4 and p.bytes_ready == 2000 * 16 * 4
    assert "waiting for users/0of1@shard-1 (loading), users/0of1@shard-2 (down)" in progress_line(p)
    nodes["shard-1"] = _node(held["shard-1"] + [users])
    nodes["shard-2"] = _node(held["shard-2"] + [users], versions=(2,))
    p = progress(active, target, TABLES, nodes, frozenset({1}))
    assert {a.node_id: a.state for a in p.adds}["shard-2"] == "versions" and not p.done
    nodes["shard-2"] = _node(held["shard-2"] + [users], versions=(1, 2))
    p = progress(active, target, TABLES, nodes, frozenset({1}))
    assert p.done and p.bytes_ready == p.bytes_total
    nodes["shard-0"] = _node([], partition_error=PartitionError(users, "disk on fire"))
    p = progress(active, target, TABLES, nodes, frozenset({1}))
    assert {a.node_id: (a.state, a.detail) for a in p.adds}["shard-0"] == ("error", "disk on fire")
    assert PartitionId("users", 0, 1) not in p.not_ready and not p.done
