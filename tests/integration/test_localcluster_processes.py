"""Stopping processes by their state-file records (``services.localcluster.processes``), on
real child processes: SIGTERM, the grace period, SIGKILL to the whole process group, and a
record whose pid now belongs to another process."""

from __future__ import annotations

import subprocess
import sys

from services.localcluster.processes import process_alive, process_start_time, stop_processes
from services.localcluster.state import ProcessRecord


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent has ended: not alive)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _child(code: str) -> tuple[subprocess.Popen[str], ProcessRecord]:
    """A Python child in its own session that prints "ready" once set up."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, ProcessRecord("child", "test", proc.pid, process_start_time(proc.pid))


def test_stop_processes_kills_what_ignores_sigterm_and_its_whole_group() -> None:
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(g.pid); print('ready', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"
        record = ProcessRecord("stubborn", "test", proc.pid, process_start_time(proc.pid))
        assert stop_processes([record], grace_s=0.3) == {"stubborn": "killed after 0.3s"}
        assert not alive(proc.pid) and not alive(grandchild)
        assert stop_processes([record], grace_s=0.3) == {"stubborn": "not running"}
    finally:
        proc.kill()
        proc.wait()


def test_stop_processes_reports_a_clean_exit_and_leaves_a_reused_pid_alone() -> None:
    proc, record = _child("import time; print('ready', flush=True); time.sleep(120)")
    try:
        reused = ProcessRecord("other", "test", proc.pid, record.started_at - 100.0)
        assert not process_alive(reused)
        assert stop_processes([reused], grace_s=0.3) == {"other": "not running"}
        assert alive(proc.pid)  # a record of another process with that pid is not this one
        assert stop_processes([record], grace_s=5.0) == {"child": "ok"}  # SIGTERM's default: exit
        assert not alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
