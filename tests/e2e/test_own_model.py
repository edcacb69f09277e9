"""Bring your own model, as a user does it (docs/your-model.md), with real processes:

- the tutorial's example (``docs/examples/own_model.py``) writes a checkpoint with numpy and
  safetensors only, serves it with ``shardrec cluster up --checkpoint ckpt`` (a relative path,
  from its own working directory), publishes a delta, and checks the scores against its own
  forward pass; here its served scores are checked against the reference path at each version;
- a TorchRec state dict imported with ``shardrec checkpoint import --torchrec`` and served with
  ``shardrec cluster up --checkpoint`` (relative, from another directory) answers TorchRec's own
  scores (``tests/fixtures/torchrec/expected.npz``) and the reference path's.

Each test brings up one local cluster (its own model), with one or two shard nodes; a
``finally`` stops whatever a failing test left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.reference import ReferenceRecommender
from services.localcluster.processes import shardrec_argv
from services.localcluster.state import read_state, state_path
from services.localcluster.status import cluster_down

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "docs" / "examples" / "own_model.py"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "torchrec"
RUN_TIMEOUT_S = 240.0
RTOL, ATOL = 1e-5, 1e-6


def run(argv: list[str], cwd: Path) -> str:
    """Run ``argv`` in ``cwd`` to completion; its output, or a failure showing it."""
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def shardrec(*args: str, cwd: Path) -> str:
    return run(shardrec_argv(sys.executable, *args), cwd)


@pytest.fixture
def work(tmp_path: Path):
    """A working directory; a cluster a failing test left under ``work/cluster`` is stopped."""
    wd = tmp_path / "work"
    wd.mkdir()
    try:
        yield wd
    finally:
        if state_path(wd / "cluster").exists():
            with open(os.devnull, "w") as quiet:
                cluster_down(wd / "cluster", 5.0, quiet)


def test_the_tutorial_example_serves_the_reference_scores_at_each_version(work: Path) -> None:
    out = run([sys.executable, str(EXAMPLE), "--workdir", "example", "--nodes", "1"], cwd=work)  # relative, too
    root = work / "example"
    assert f"serving the checkpoint {root / 'ckpt'}: model 'my_model' version 1" in out, out
    assert "OK: every score served at versions 1 and 2" in out, out
    assert not state_path(root / "cluster").exists(), "the example stops its cluster"
    served = json.loads((root / "served.json").read_text())["versions"]
    assert sorted(served) == ["1", "2"]
    for version, answers in served.items():
        reference = ReferenceRecommender(str(root / "ckpt"), int(version))
        for a in answers:
            assert a["version"] == int(version)
            want = reference.scores(a["user_id"], a["candidates"])
            np.testing.assert_allclose(a["scores"], want[a["positions"]], rtol=RTOL, atol=ATOL, err_msg=str(a))
        assert reference.model.manifest.kind == ("base" if version == "1" else "delta")


def test_an_imported_torchrec_state_dict_serves_torchrecs_scores(work: Path) -> None:
    fixture = os.path.relpath(FIXTURE, work)
    shardrec(
        "checkpoint", "import", "--torchrec", f"{fixture}/dlrm.pt", "--config", f"{fixture}/map.toml",
        "--features", fixture, "--out", "ckpt", cwd=work,
    )  # fmt: skip
    up = shardrec("cluster", "up", "--checkpoint", "ckpt", "--workdir", "cluster", "--nodes", "1", "--requests", "2", cwd=work)
    assert f"serving the checkpoint {work / 'ckpt'}: model 'torchrec_fixture'" in up, up
    assert "request 2/2: user " in up, up  # sample requests drawn from its own tables (t_users, t_items)
    state = read_state(work / "cluster")
    assert state is not None and state.frontend
    # from another directory, the model pointer names the checkpoint by its absolute path
    status = shardrec("cluster", "status", "--workdir", str(work / "cluster"), cwd=REPO_ROOT)
    assert f"at {work / 'ckpt'}" in status, status

    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as z:
        users, items, torchrec_scores = z["sample_user_id"], z["sample_item_id"], z["scores"]
    reference = ReferenceRecommender(str(work / "ckpt"))
    with grpc.insecure_channel(state.frontend) as channel:
        stub = recommend_pb2_grpc.RecommenderStub(channel)
        for user in dict.fromkeys(users.tolist()):
            candidates = items[users == user].tolist()
            reply = stub.Recommend(
                recommend_pb2.RecommendRequest(user_id=user, candidate_item_ids=candidates, top_k=len(candidates)), timeout=30
            )
            positions = [it.position for it in reply.items]
            got = np.array([it.score for it in reply.items], dtype=np.float32)
            assert sorted(positions) == list(range(len(candidates)))
            np.testing.assert_allclose(got, torchrec_scores[users == user][positions], rtol=RTOL, atol=ATOL, err_msg=f"user {user}")
            np.testing.assert_allclose(got, reference.scores(user, candidates)[positions], rtol=RTOL, atol=ATOL)

    shardrec("cluster", "down", "--workdir", "cluster", cwd=work)
    assert not state_path(work / "cluster").exists()
