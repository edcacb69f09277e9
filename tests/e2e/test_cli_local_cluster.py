"""The one-command local cluster as a user runs it: ``shardrec demo`` and ``shardrec cluster
up|status|down`` as real processes (real ZooKeeper, Redis, shards, frontend), and the promise
that no process they start outlives them: also on SIGINT, on a failed step, and when the
launcher itself is killed (``cluster down`` then finds everything in the state file).

Every test checks the pids the launcher printed or recorded, and a ``finally`` stops whatever
a failing test left (``cluster_down`` on the state file), so the suite leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.localcluster.processes import process_alive, shardrec_argv
from services.localcluster.state import ROLE_JOB, ClusterState, read_state, state_path
from services.localcluster.status import cluster_down
from tests.support.processes import ProcessFactory, ServiceProcess
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
FRONTEND_MAIN = REPO_ROOT / "services" / "frontend" / "main.py"
needs_frontend = pytest.mark.skipif(
    not FRONTEND_MAIN.exists(),
    reason="services/frontend/main.py does not exist yet (the frontend lands soon); "
    "the shards-only and signal tests below cover the launcher meanwhile",
)

RUN_TIMEOUT_S = 240.0
SERVICES = {"zookeeper", "redis", "shard-0", "shard-1", "shard-2", "frontend"}
# "request 2/3: user 17, 100 candidates -> top 10 in 8.4 ms (version 1, shard map 1)"
RESPONSE_LINE = re.compile(
    r"^request (\d+)/(\d+): user (\d+), 100 candidates -> top 10 in [\d.]+ ms \(version 1, shard map 1\)$", re.MULTILINE
)
ITEM_LINE = re.compile(r"^ +\d+\. item +\d+  score [01]\.\d{4}$", re.MULTILINE)
PID = re.compile(r"\(pid (\d+)\)")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent has ended: not alive)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shardrec(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``shardrec ARGS`` to completion (for the short commands: status, down)."""
    return subprocess.run(
        shardrec_argv(sys.executable, *args),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(proc: ServiceProcess, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    code = proc.wait(timeout_s)
    return code, proc.log_text()


@pytest.fixture
def workdir(tmp_path: Path):
    """A work directory; whatever a failing test leaves running there is stopped at teardown."""
    wd = tmp_path / "cluster"
    try:
        yield wd
    finally:
        if state_path(wd).exists():
            with open(os.devnull, "w") as quiet:
                cluster_down(wd, 5.0, quiet)


def assert_all_gone(pids: list[int]) -> None:
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes still running: {left}"


@needs_frontend
def test_demo_serves_requests_and_leaves_nothing_running(spawn: ProcessFactory, workdir: Path) -> None:
    proc = spawn("demo", "--preset", "small", "--workdir", str(workdir), "--requests", "3", name="demo")
    code, out = finish(proc)
    assert code == 0, out
    responses = RESPONSE_LINE.findall(out)
    assert [(i, n) for i, n, _user in responses] == [("1", "3"), ("2", "3"), ("3", "3")], out
    assert len(ITEM_LINE.findall(out)) == 3 * 10, out
    pids = sorted({int(p) for p in PID.findall(out)})  # printed when started and when stopped
    assert len(pids) == len(SERVICES), out  # zookeeper, redis, 3 shards, frontend
    assert_all_gone(pids)
    assert not state_path(workdir).exists()
    for name in SERVICES:
        assert (workdir / "logs" / f"{name}.log").exists()
    assert "every process stopped" in out


@needs_frontend
def test_cluster_up_status_down(spawn: ProcessFactory, workdir: Path) -> None:
    code, out = finish(spawn("cluster", "up", "--preset", "small", "--workdir", str(workdir), "--requests", "1", name="up"))
    assert code == 0, out
    assert len(RESPONSE_LINE.findall(out)) == 1, out
    state = read_state(workdir)
    assert state is not None and state.ready and state.launcher is None
    assert {p.name for p in state.processes} == SERVICES
    assert all(process_alive(p) for p in state.processes)
    assert f"{state.frontend} shardrec.v1.Recommender/Recommend" in out

    status = shardrec("cluster", "status", "--workdir", str(workdir))
    assert status.returncode == 0, status.stdout + status.stderr
    for node in ("shard-0", "shard-1", "shard-2"):
        assert re.search(rf"^  {node} +yes +127\.0\.0\.1:\d+ +1 ", status.stdout, re.MULTILINE), status.stdout
    assert "active shard map version 1" in status.stdout
    assert f"({state.frontend}, version 1)" in status.stdout

    down = shardrec("cluster", "down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert_all_gone([p.pid for p in state.processes])
    assert not state_path(workdir).exists()


def test_shards_only_up_status_down_and_a_second_up_is_refused(spawn: ProcessFactory, workdir: Path) -> None:
    args = ("cluster", "up", "--preset", "small", "--workdir", str(workdir), "--shards-only", "--nodes", "2")
    code, out = finish(spawn(*args, name="up"))
    assert code == 0, out
    state = read_state(workdir)
    assert state is not None and state.ready
    assert [p.name for p in state.processes] == ["zookeeper", "redis", "shard-0", "shard-1"]
    assert all(process_alive(p) for p in state.processes)
    assert all(p.address.startswith("127.0.0.1:") for p in state.processes)

    again, again_out = finish(spawn(*args, name="up-again"))
    assert again == 1 and "is still running" in again_out, again_out
    assert read_state(workdir) == state  # the refused launcher left the state file alone
    assert all(process_alive(p) for p in state.processes)

    status = shardrec("cluster", "status", "--workdir", str(workdir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^  shard-1 +yes ", status.stdout, re.MULTILINE), status.stdout
    assert "frontends: (none live)" in status.stdout

    down = shardrec("cluster", "down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert_all_gone([p.pid for p in state.processes])
    assert shardrec("cluster", "status", "--workdir", str(workdir)).returncode == 2


def test_sigint_while_starting_stops_everything(spawn: ProcessFactory, workdir: Path) -> None:
    proc = spawn("cluster", "up", "--preset", "small", "--workdir", str(workdir), "--shards-only", name="up")
    wait_for(lambda: "starting shard-2" in proc.log_text(), 120, "the launcher to start shard-2")
    state = read_state(workdir)
    assert state is not None
    started = [p.pid for p in state.processes if p.role != ROLE_JOB]
    os.kill(proc.pid, signal.SIGINT)
    code, out = finish(proc)
    if code == 0:  # the shards registered before the signal arrived: nothing to check here
        pytest.skip("the cluster was up before SIGINT arrived")
    assert code == 128 + signal.SIGINT, out
    assert "interrupted (SIGINT): stopping the cluster" in out
    assert_all_gone(started + [int(p) for p in PID.findall(out)])
    assert not state_path(workdir).exists()


def test_cluster_down_stops_what_a_killed_launcher_left(spawn: ProcessFactory, workdir: Path) -> None:
    proc = spawn("cluster", "up", "--preset", "small", "--workdir", str(workdir), "--shards-only", name="up")

    def shards_recorded() -> ClusterState | None:
        state = read_state(workdir)
        return state if state is not None and state.record("shard-2") is not None else None

    state = wait_for(shards_recorded, 120, "the launcher to record shard-2 in the state file")
    proc.kill()  # SIGKILL: no teardown runs; ZooKeeper, Redis and the shards are orphans now
    state = read_state(workdir)
    assert state is not None
    orphans = [p.pid for p in state.processes]
    assert any(alive(pid) for pid in orphans)

    down = shardrec("cluster", "down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert_all_gone(orphans)
    assert not state_path(workdir).exists()


def test_a_failed_step_prints_the_log_tail_and_stops_everything(spawn: ProcessFactory, workdir: Path) -> None:
    # mixed.json wants 2 replicas of most tables: one node cannot hold them, placement init fails.
    proc = spawn("demo", "--preset", "small", "--workdir", str(workdir), "--nodes", "1", name="demo")
    code, out = finish(proc)
    assert code == 1, out
    assert "FAILED: `shardrec placement init` failed with exit code 1" in out
    assert "last lines of" in out and "2 replicas but only 1 nodes" in out
    assert_all_gone([int(p) for p in PID.findall(out)])
    assert not state_path(workdir).exists()
