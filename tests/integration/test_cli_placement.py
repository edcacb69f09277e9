"""``shardrec placement init|show`` as commands: what they print, their refusals and exit codes
(the library under them is ``services.control.placement``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kazoo.client import KazooClient

from services.admin.cli import main
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import ModelPointer, NodeRecord
from services.core.discovery.registry import NodeRegistration
from services.core.discovery.zk_paths import ZkPaths
from services.core.placement import node_ids
from services.core.types import TableSpec
from tests.support.cluster import wait_registered

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = (TableSpec("users", 100, 4), TableSpec("items", 60, 4), TableSpec("tags", 10, 4))


def write_checkpoint(root: Path, version: int, tables=TABLES) -> None:
    """A minimal complete version: manifest.json (listing the files a base has) + COMPLETE."""
    from services.core.checkpoint.manifest import FileEntry, Manifest, ModelSpec, table_file
    from services.core.types import DenseArch, FeatureSide, PoolingType, SparseFeatureSpec

    dim = tables[0].dim
    model = ModelSpec(
        name="tiny",
        tables=tuple(tables),
        sparse_features=tuple(SparseFeatureSpec(f"f_{t.name}", t.name, FeatureSide.USER, PoolingType.SUM) for t in tables),
        dense_features=(),
        dense_arch=DenseArch(num_dense=0, embedding_dim=dim, num_sparse=len(tables), bottom_mlp=(dim,), top_mlp=(1,)),
    )
    files = tuple(FileEntry(table_file(t.name), 0, "0" * 64) for t in tables) + (FileEntry("dense.safetensors", 0, "0" * 64),)
    data = Manifest(version=version, kind="base", parent=None, model=model, files=files).to_bytes()
    folder = root / "versions" / str(version)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(data)
    (folder / "COMPLETE").write_text(hashlib.sha256(data).hexdigest())


def test_placement_init_and_show(tmp_path: Path, zk: KazooClient, zk_config: ZkConfig, zk_paths: ZkPaths, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, 1)
    write_checkpoint(ckpt, 2)
    (ckpt / "versions" / "3").mkdir()  # partial: no COMPLETE, ignored
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"default": {"sharding": "replicated"}, "tables": {"users": {"sharding": "row_wise", "partitions": 3}}}))
    common = ["--zk", zk_config.hosts, "--cluster", zk_config.cluster]
    init = ["placement", "init", "--checkpoint", str(ckpt), "--nodes", "3", "--spec", str(spec), *common]

    assert main(init) == 0
    out = capsys.readouterr().out
    assert "shard map version 1 over 3 nodes" in out and "shard-2" in out and "users/2" in out

    store = ClusterStore(zk, zk_paths)
    m, _ = store.read_active()
    assert m.version == 1 and m.nodes == node_ids(3) and m.num_partitions("users") == 3
    assert store.read_model() == ModelPointer(uri=str(ckpt), name="tiny")
    assert (store.read_serving_version(), store.read_target_version()) == (2, 2)

    assert main(init) == 1  # refuses to overwrite
    assert "already has an active shard map" in capsys.readouterr().err
    assert store.read_active()[0].version == 1

    assert main([*init, "--force"]) == 0
    assert store.read_active()[0].version == 2
    capsys.readouterr()

    NodeRegistration(zk, zk_paths.node("shard-1"), NodeRecord(node_id="shard-1", address="127.0.0.1:9", versions_ready=(2,))).register()
    assert main(["placement", "show", *common]) == 0
    out = capsys.readouterr().out
    assert "active shard map version 2" in out
    assert "127.0.0.1:9" in out and "serving version: 2" in out


def test_cli_as_a_process_reports_a_missing_map(zk_config: ZkConfig, spawn) -> None:
    proc = spawn("placement", "show", "--zk", zk_config.hosts, "--cluster", zk_config.cluster)
    assert proc.wait(30) == 1
    assert "has no active shard map" in proc.log_text()


def test_a_relative_checkpoint_is_published_absolute_so_shards_started_elsewhere_find_it(
    tmp_path: Path, zk: KazooClient, zk_config: ZkConfig, zk_paths: ZkPaths, spawn, monkeypatch
) -> None:
    # The bug: `cd W && shardrec model synth --out ckpt --preset small && shardrec placement init
    # --checkpoint ckpt ...` published {"uri": "ckpt"}; a shard started in any other directory
    # exited with "ckpt: version 1 does not exist".
    work, elsewhere = tmp_path / "W", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["model", "synth", "--out", "ckpt", "--preset", "small"]) == 0
    spec = str(REPO_ROOT / "deploy" / "placement" / "replicated.json")
    common = ["--zk", zk_config.hosts, "--cluster", zk_config.cluster]
    assert main(["placement", "init", "--checkpoint", "ckpt", "--nodes", "1", "--spec", spec, *common]) == 0
    store = ClusterStore(zk, zk_paths)
    assert store.read_model().uri == str(work / "ckpt")

    shard = spawn("shard", "serve", "--node-id", "shard-0", *common, "--session-timeout-s", "1.0", name="shard-0", cwd=elsewhere)
    assert wait_registered(zk, zk_paths, "shard-0")["versions_ready"] == [1], shard.log_text()

    # a relative file: URI likewise
    assert main(["placement", "init", "--checkpoint", "file:ckpt", "--nodes", "1", "--spec", spec, "--force", *common]) == 0
    assert store.read_model().uri == (work / "ckpt").as_uri()
