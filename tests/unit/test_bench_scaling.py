"""Pure parts of `bench compare` / `bench scaling`: target ratios, per-point configs, node specs."""

import json
from pathlib import Path

from benchmarks.compare import CompareConfig, targets
from benchmarks.scaling import node_spec, point_config
from services.localcluster.config import LocalClusterConfig
from services.core.placement import PlacementSpec, initial_shard_map, node_ids
from services.core.synth import model_spec


def _run(label, p50, p99, cpu, wire=None):
    return {"label": label, "latency_ms": {"p50_ms": p50, "p99_ms": p99}, "cpu_seconds_per_request": cpu, "wire_bytes_per_request": wire}


def test_targets_are_ratios_of_the_same_run():
    doc = {"systems": [
        {"name": "monolith", "runs": [_run("low-load", 5.0, 9.0, None), _run("cpu", 5, 9, 0.004)], "sweep": {"saturation_rps": 400}},
        {"name": "redis-kv", "runs": [_run("low-load", 7, 12, None), _run("cpu", 7, 12, 0.005, {"user": 4000, "item": 80000, "total": 84000})], "sweep": {"saturation_rps": 200}},
        {"name": "shardrec", "runs": [_run("low-load", 6.0, 11.0, None), _run("cpu", 6, 11, 0.0048, {"user": 300, "item": 30000, "total": 30300})], "sweep": {"saturation_rps": 320}},
        {"name": "shardrec-nobatch", "runs": [], "sweep": {"saturation_rps": 100}},
    ]}  # fmt: skip
    got = {t: (m, ok) for t, m, _, ok in targets(doc)}
    assert got["latency gap to monolith at low load, p50"] == ("+1.00 ms", True)
    assert got["latency gap to monolith at low load, p99"] == ("+2.00 ms", True)
    assert got["CPU per Recommend vs monolith (all processes)"] == ("1.20x", True)
    assert got["saturation throughput vs redis-kv"][1] is True  # 1.6x
    assert got["micro-batching on vs off, saturation"][1] is True  # 3.2x
    assert got["user-side bytes per Recommend vs redis-kv"][1] is True  # 0.075
    assert got["total bytes per Recommend vs redis-kv"][1] is True  # 0.36


def test_node_specs_place_the_demo_model(tmp_path):
    spec = model_spec("demo")
    for n in (1, 2, 4):
        raw = json.loads(node_spec(n, tmp_path).read_text())
        smap = initial_shard_map(PlacementSpec.from_json(raw), spec.tables, node_ids(n))
        assert set(smap.nodes) == set(node_ids(n))
        assert all(smap.partitions_of(node) for node in smap.nodes), "a node holds nothing"


def test_point_config_changes_one_dimension(tmp_path):
    base = CompareConfig(cluster=LocalClusterConfig(workdir=tmp_path, spec=Path("x.json")), systems=("shardrec",), out_dir=tmp_path)
    assert point_config(base, "candidates", 10, tmp_path).candidates == 10
    assert point_config(base, "nodes", 4, tmp_path).cluster.nodes == 4
    assert point_config(base, "table-size", "large", tmp_path).cluster.preset == "large"
