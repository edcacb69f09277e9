"""The pure parts of the local cluster (``services.localcluster``): state file, stop order,
sample requests, output formats, progress lines, signal guard, model reuse."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from services.core.discovery.records import FrontendRecord, ModelPointer, NodeRecord
from services.localcluster.config import DEFAULT_SPEC, REPO_ROOT, LocalClusterConfig, existing_model, resolve_spec
from services.localcluster.console import Progress
from services.localcluster.demo import (
    NUM_CANDIDATES,
    SampleRequest,
    call_instructions,
    format_response,
    sample_requests,
)
from services.localcluster.processes import parse_metrics, parse_ready, worker_metrics
from services.localcluster.processes import Interrupted, SignalGuard, stop_groups
from services.localcluster.state import (
    ROLE_FRONTEND,
    ROLE_LAUNCHER,
    ROLE_REDIS,
    ROLE_SHARD,
    ROLE_ZOOKEEPER,
    STATE_FILE,
    STATE_FORMAT,
    ClusterState,
    ProcessRecord,
    read_state,
    remove_state,
    write_state,
)
from services.localcluster.status import ZkView, format_processes, format_zk_view
from services.core.errors import ConfigError


def _rec(name: str, role: str, pid: int = 100, address: str = "") -> ProcessRecord:
    return ProcessRecord(name, role, pid, 1_700_000_000.25, f"/w/logs/{name}.log", address)


def _state() -> ClusterState:
    return ClusterState(
        cluster="local",
        workdir="/w",
        mode="up",
        created_at="2026-01-01T00:00:00+0000",
        zk="127.0.0.1:2181",
        redis_url="redis://127.0.0.1:6379/0",
        redis_prefix="local:",
        checkpoint="/w/model/small-seed0",
        frontend="127.0.0.1:8500",
        ready=True,
        launcher=_rec("launcher", ROLE_LAUNCHER, pid=7),
        processes=[
            _rec("zookeeper", ROLE_ZOOKEEPER, 1, "127.0.0.1:2181"),
            _rec("redis", ROLE_REDIS, 2, "127.0.0.1:6379"),
            _rec("shard-0", ROLE_SHARD, 3, "127.0.0.1:4000"),
            _rec("shard-1", ROLE_SHARD, 4, "127.0.0.1:4001"),
            _rec("frontend", ROLE_FRONTEND, 5, "127.0.0.1:8500"),
        ],
    )


# -- state file ------------------------------------------------------------------------------


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    state = _state()
    write_state(tmp_path, state)
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    assert raw["format"] == STATE_FORMAT
    assert [p["pid"] for p in raw["processes"]] == [1, 2, 3, 4, 5]
    assert read_state(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left
    remove_state(tmp_path)
    assert read_state(tmp_path) is None
    remove_state(tmp_path)  # idempotent


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other/v9"}', "format"),
        (json.dumps({"format": STATE_FORMAT, "cluster": "x"}), "malformed"),
        (json.dumps({"format": STATE_FORMAT, "cluster": "x", "workdir": "/w", "mode": "up", "processes": [{"name": "a"}]}), "malformed"),
    ],
)
def test_a_bad_state_file_is_refused_with_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_state(tmp_path)


def test_stop_order_is_reverse_start_order_with_shards_together() -> None:
    groups = stop_groups(_state().processes)
    assert [[r.name for r in g] for g in groups] == [["frontend"], ["shard-1", "shard-0"], ["redis"], ["zookeeper"]]
    assert stop_groups([]) == []


# -- sample requests -------------------------------------------------------------------------


def test_sample_requests_are_deterministic_power_law_and_distinct() -> None:
    a = sample_requests(num_users=2000, num_items=5000, n=20, seed=3)
    assert a == sample_requests(num_users=2000, num_items=5000, n=20, seed=3)
    assert a != sample_requests(num_users=2000, num_items=5000, n=20, seed=4)
    for req in a:
        assert 0 <= req.user_id < 2000
        assert len(req.candidate_item_ids) == NUM_CANDIDATES
        assert len(set(req.candidate_item_ids)) == NUM_CANDIDATES
        assert all(0 <= i < 5000 for i in req.candidate_item_ids)
    # power law: low ids are hot, so the median candidate sits far below the middle of the table
    ids = sorted(i for req in a for i in req.candidate_item_ids)
    assert ids[len(ids) // 2] < 1000


def test_sample_requests_on_a_tiny_table_take_every_item() -> None:
    (req,) = sample_requests(num_users=1, num_items=7, n=1, seed=0)
    assert req.user_id == 0
    assert sorted(req.candidate_item_ids) == list(range(7))


# -- output formats --------------------------------------------------------------------------


def test_format_response_shows_user_latency_versions_and_ranked_items() -> None:
    req = SampleRequest(42, tuple(range(100)))
    text = format_response(2, 5, req, [(7, 0.91234), (1234, 0.5)], 8.04, 3, 2)
    lines = text.splitlines()
    assert lines[0] == "request 2/5: user 42, 100 candidates -> top 2 in 8.0 ms (version 3, shard map 2)"
    assert lines[1] == "    1. item    7  score 0.9123"
    assert lines[2] == "    2. item 1234  score 0.5000"


@pytest.mark.parametrize(
    "text, role, expected",
    [
        ("LISTENING frontend 127.0.0.1:5\nREADY frontend 127.0.0.1:5\n", "frontend", "127.0.0.1:5"),
        ("log line\nREADY shard-0 10.0.0.1:7\n", "shard-0", "10.0.0.1:7"),
        ("LISTENING frontend 127.0.0.1:5\n", "frontend", None),
        ("xREADY frontend 127.0.0.1:5\n", "frontend", None),
        ("READY frontend-2 127.0.0.1:5\n", "frontend", None),
        ("", "frontend", None),
    ],
)
def test_parse_ready(text: str, role: str, expected: str | None) -> None:
    assert parse_ready(text, role) == expected


def test_a_frontend_with_workers_is_scraped_at_every_workers_endpoint() -> None:
    from services.localcluster.prometheus import targets

    log = "METRICS frontend 127.0.0.1:7\nx METRICS frontend 1:2\nMETRICS frontend 127.0.0.1:8\nREADY frontend 127.0.0.1:5\n"
    assert parse_metrics(log, "frontend") == ["127.0.0.1:7", "127.0.0.1:8"]
    assert worker_metrics(log) == {"metrics": "127.0.0.1:7,127.0.0.1:8"}
    assert worker_metrics("METRICS frontend 127.0.0.1:7\n") == {}  # one process: the launcher's own port
    state = ClusterState(cluster="c", workdir="/w", mode="up", created_at="t")
    state.processes = [
        ProcessRecord("frontend", ROLE_FRONTEND, 1, 0.0, metrics="127.0.0.1:7,127.0.0.1:8"),
        ProcessRecord("shard-0", ROLE_SHARD, 2, 0.0, metrics="127.0.0.1:9"),
        ProcessRecord("redis", "redis", 3, 0.0),
    ]
    assert [(g["labels"]["process"], g["targets"]) for g in targets(state)] == [
        ("frontend", ["127.0.0.1:7", "127.0.0.1:8"]),
        ("shard-0", ["127.0.0.1:9"]),
    ]
    assert ProcessRecord.from_json({"name": "r", "role": "redis", "pid": 3, "started_at": 0}).metrics_endpoints == ()


def test_call_instructions_name_the_address_and_how_to_stop() -> None:
    text = call_instructions(_state(), "var/demo")
    assert "grpcurl -plaintext" in text and "127.0.0.1:8500 shardrec.v1.Recommender/Recommend" in text
    assert 'grpc.insecure_channel("127.0.0.1:8500")' in text
    assert "shardrec cluster down --workdir var/demo" in text
    assert "shardrec placement show --zk 127.0.0.1:2181 --cluster local" in text
    no_frontend = call_instructions(ClusterState("local", "/w", "up", "", zk="127.0.0.1:1"), "w")
    assert "grpcurl" not in no_frontend and "without a frontend" in no_frontend


def test_the_python_snippet_of_the_instructions_is_valid_python() -> None:
    text = call_instructions(_state(), "var/demo")
    snippet = text.split("or from Python")[1].split("\n\n")[0].splitlines()[1:]
    assert len(snippet) == 5
    compile("\n".join(line.strip() for line in snippet), "<snippet>", "exec")


def test_format_processes_and_zk_view() -> None:
    state = _state()
    table = format_processes(state, {p.name: p.name != "shard-1" for p in state.processes})
    rows = table.splitlines()
    assert rows[0].split() == ["PROCESS", "PID", "STATE", "ADDRESS", "LOG"]
    assert rows[4].split()[:3] == ["shard-1", "4", "NOT"]
    assert rows[3].split()[:4] == ["shard-0", "3", "running", "127.0.0.1:4000"]

    view = ZkView(
        model=ModelPointer(uri="/w/model", name="demo"),
        serving_version=1,
        map_version=2,
        map_nodes=("shard-0", "shard-1"),
        partitions_of={"shard-0": ("users/0",), "shard-1": ("users/1",)},
        nodes={"shard-0": NodeRecord(address="127.0.0.1:4000", partitions=("users/0",), versions_ready=(1,),
                                     serving_version=1, map_version=2)},
        frontends={"frontend-a": FrontendRecord(address="127.0.0.1:8500", version=1)},
    )
    text = format_zk_view(view)
    assert "serving version 1, active shard map version 2" in text
    lines = text.splitlines()
    assert lines[2].split() == ["shard-0", "yes", "127.0.0.1:4000", "1", "1", "2", "users/0"]
    assert lines[3].split() == ["shard-1", "no", "-", "-", "-", "-", "(owns", "users/1)"]
    assert "frontends: frontend-a (127.0.0.1:8500, version 1)" in text
    empty = format_zk_view(ZkView(None, None, None, (), {}, {}, {}))
    assert "frontends: (none live)" in empty and "active shard map version -" in empty


def test_progress_lines() -> None:
    out = io.StringIO()
    p = Progress(out)
    with p.step("starting ZooKeeper on 127.0.0.1:1") as note:
        note["detail"] = "(pid 9)"
    with p.step("waiting for shards"):
        p.line("  shard-0 registered")
    with pytest.raises(ValueError):
        with p.step("placement init"):
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with p.step("loading"):
            raise KeyboardInterrupt
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("starting ZooKeeper on 127.0.0.1:1 ... ok ") and lines[0].endswith("s (pid 9)")
    assert lines[1] == "waiting for shards ... "
    assert lines[2] == "  shard-0 registered"
    assert lines[3].startswith("  ... ok ")
    assert lines[4].startswith("placement init ... FAILED after ")
    assert lines[5].startswith("loading ... interrupted after ")


# -- config ----------------------------------------------------------------------------------


def test_resolve_spec_finds_the_shipped_spec_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_spec(DEFAULT_SPEC) == (REPO_ROOT / DEFAULT_SPEC).resolve()
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert resolve_spec("mine.json") == mine.resolve()
    with pytest.raises(ConfigError, match="not found"):
        resolve_spec("nope.json")


def test_config_validates_and_places_the_model_per_preset_and_seed(tmp_path: Path) -> None:
    cfg = LocalClusterConfig(workdir=tmp_path, spec=tmp_path / "s.json", preset="small", seed=4)
    assert cfg.checkpoint == tmp_path / "model" / "small-seed4"
    assert cfg.logs_dir == tmp_path / "logs"
    assert cfg.redis_prefix == "local:"
    with pytest.raises(ConfigError, match="nodes"):
        LocalClusterConfig(workdir=tmp_path, spec=tmp_path, nodes=0)
    with pytest.raises(ConfigError, match="cluster"):
        LocalClusterConfig(workdir=tmp_path, spec=tmp_path, cluster="a/b")


def test_existing_model_is_reused_only_when_complete_and_of_the_preset(tmp_path: Path) -> None:
    from services.core import synth

    root = tmp_path / "m"
    assert existing_model(root, "small") is None
    root.mkdir()
    version, why = existing_model(root, "small")  # type: ignore[misc]
    assert version == 0 and "no complete version" in why
    synth.synthesize(root, "small", seed=0)
    assert existing_model(root, "small") == (1, "")
    version, why = existing_model(root, "demo")  # type: ignore[misc]
    assert version == 0 and "not the 'demo' preset" in why
    (root / synth.feature_file("item")).unlink()
    version, why = existing_model(root, "small")  # type: ignore[misc]
    assert version == 0 and "items.npz is missing" in why


# -- signals ---------------------------------------------------------------------------------


def test_signal_guard_defers_raises_shields_and_restores() -> None:
    before = {s: signal.getsignal(s) for s in SignalGuard.SIGNALS}
    err = io.StringIO()
    with SignalGuard(err) as guard:
        with pytest.raises(Interrupted) as raised:
            signal.raise_signal(signal.SIGTERM)
        assert raised.value.exit_code == 143

        reached = False
        with pytest.raises(Interrupted) as raised:
            with guard.deferred():
                signal.raise_signal(signal.SIGINT)
                reached = True  # the critical section ran to its end
        assert reached and raised.value.exit_code == 130

        with guard.shielded():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGHUP)
        assert err.getvalue().count("already stopping") == 2
    assert {s: signal.getsignal(s) for s in SignalGuard.SIGNALS} == before


# -- any checkpoint ---------------------------------------------------------------------------


def _own_spec(user_entity: bool = True, item_entity: bool = True):
    """A model whose tables are not called users / items."""
    from services.core.checkpoint.manifest import ModelSpec
    from services.core.types import DenseArch, FeatureSide, FeatureSource, MappingKind, PoolingType, SparseFeatureSpec, TableSpec

    sparse = [SparseFeatureSpec("tag", "tags", FeatureSide.ITEM, PoolingType.SUM, 3, MappingKind.MODULO)]
    if user_entity:
        sparse.append(SparseFeatureSpec("acct", "accounts", FeatureSide.USER, PoolingType.SUM, 1, MappingKind.MODULO, FeatureSource.ENTITY_ID))
    if item_entity:
        sparse.append(SparseFeatureSpec("prod", "products", FeatureSide.ITEM, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.ENTITY_ID))
    tables = (TableSpec("accounts", 50, 4), TableSpec("products", 30, 4), TableSpec("tags", 9, 4))
    return ModelSpec("own", tables, tuple(sparse), (), DenseArch(0, 4, len(sparse), (4,), (1,)))


def test_config_with_a_checkpoint_makes_its_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = LocalClusterConfig(workdir=tmp_path / "w", spec=None, checkpoint_uri="ckpt", features_root="file:other")
    assert cfg.checkpoint == cfg.checkpoint_uri == str(tmp_path / "ckpt")
    assert cfg.features == cfg.features_root == (tmp_path / "other").as_uri()
    assert LocalClusterConfig(workdir=tmp_path, spec=None, checkpoint_uri="/abs/ckpt").features == "/abs/ckpt"
    with pytest.raises(ConfigError, match="--features needs --checkpoint"):
        LocalClusterConfig(workdir=tmp_path, spec=None, features_root="other")


def test_sample_requests_read_id_ranges_from_the_models_entity_features(tmp_path: Path) -> None:
    from services.core.synth import save_npz
    from services.core.types import FeatureSide
    from services.localcluster.demo import ANY_IDS, entity_ids, model_requests

    spec = _own_spec()
    assert entity_ids(spec, FeatureSide.USER, None) == range(50)
    assert entity_ids(spec, FeatureSide.ITEM, None) == range(30)
    reqs = model_requests(spec, None, 3, seed=1)
    assert len(reqs) == 3 and all(0 <= r.user_id < 50 and sorted(r.candidate_item_ids) == list(range(30)) for r in reqs)
    # no entity-id feature on the item side: the stored items' ids, else any ids
    bare = _own_spec(item_entity=False)
    assert entity_ids(bare, FeatureSide.ITEM, tmp_path) == range(ANY_IDS)
    save_npz(tmp_path / "features" / "items.npz", {"item_id": np.array([900, -5, 7, 900], dtype=np.int64)})
    assert entity_ids(bare, FeatureSide.ITEM, tmp_path) == [-5, 7, 900]
    (r,) = model_requests(bare, tmp_path, 1, seed=0)
    assert sorted(r.candidate_item_ids) == [-5, 7, 900]


def test_the_planned_spec_places_any_model_on_any_node_count(tmp_path: Path) -> None:
    from services.control.placement import planned_spec
    from services.core.placement import initial_shard_map, node_ids
    from services.core.types import ShardingType, TableSpec

    tables = (TableSpec("small", 100, 8), TableSpec("big", 200_000, 64))  # 3 KiB, 49 MiB
    for nodes in (1, 2, 3, 5):
        spec = planned_spec(tables, nodes)
        assert spec.for_table("small").sharding is ShardingType.REPLICATED
        assert spec.for_table("big").sharding is ShardingType.TABLE_WISE
        assert spec.for_table("big").resolve_replicas(nodes) == min(2, nodes)
        smap = initial_shard_map(spec, tables, node_ids(nodes))
        assert set(smap.tables) == {"small", "big"}
