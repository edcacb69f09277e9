"""Processes of a local cluster by pid: liveness (pid + start time), stopping and reaping
(SIGTERM, grace, SIGKILL to the process group), the stop order, and ``SignalGuard``, which turns
SIGINT, SIGTERM and SIGHUP into ``Interrupted`` (docs/local-cluster.md, "Signals"); the lines a
child prints when it is up (``parse_ready``, ``parse_http``).

Main thread only. psutil is imported inside the functions.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from services.localcluster.console import Progress
from services.localcluster.state import ClusterState, ProcessRecord

# Step of the polling loops below (each checks a condition; none waits for time to pass).
_POLL_S = 0.05


def shardrec_argv(python: str, *cli_args: str) -> list[str]:
    """The argv that runs ``shardrec <cli_args>`` with the interpreter ``python``: the
    project's console script (what ``pip install`` puts next to the interpreter, or else on
    PATH), run by that interpreter. ConfigError when the project is not installed."""
    import shutil

    from services.core.errors import ConfigError

    script = Path(python).parent / "shardrec"
    if not script.exists():
        found = shutil.which("shardrec")
        if found is None:
            raise ConfigError(f"the shardrec command is not installed next to {python} nor on PATH: pip install -e . (make setup)")
        script = Path(found)
    return [python, str(script), *cli_args]


def process_start_time(pid: int) -> float:
    """The start time of process ``pid`` (seconds since the epoch, as psutil reports it)."""
    import psutil

    return psutil.Process(pid).create_time()


def process_alive(record: ProcessRecord) -> bool:
    """True when the process of ``record`` runs: same pid, same start time, not a zombie."""
    import psutil

    try:
        p = psutil.Process(record.pid)
        if abs(p.create_time() - record.started_at) > 0.5:
            return False  # the pid was reused by another process
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_processes(records: Sequence[ProcessRecord], grace_s: float, *, groups: bool = True) -> dict[str, str]:
    """Stop ``records`` together: SIGTERM to each live one, wait up to ``grace_s`` for all,
    then SIGKILL each one still alive, with its whole process group when ``groups`` (every
    process the local cluster starts leads its own group). Reaps our own children.

    Returns name -> outcome ("ok", "exit 3", "killed after 15.0s", "not running"). Every
    process of the records is gone on return (SIGKILL cannot be refused; a zombie waiting
    for its parent counts as gone), as is anything else left in their process groups. A
    record whose pid now belongs to another process (start time differs) is left alone.
    """
    out: dict[str, str] = {}
    pending: list[ProcessRecord] = []
    for r in records:
        if not process_alive(r):
            out[r.name] = _outcome(_reap(r.pid), "not running")
            continue
        try:
            os.kill(r.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            os.kill(r.pid, signal.SIGTERM)
            pending.append(r)
        except ProcessLookupError:
            out[r.name] = "not running"
    deadline = time.monotonic() + grace_s
    killed: list[ProcessRecord] = []
    while pending:
        for r in list(pending):
            code = _reap(r.pid)
            if code is not None or not process_alive(r):
                pending.remove(r)
                out[r.name] = _outcome(code, "ok")
        if not pending:
            break
        if time.monotonic() >= deadline and not killed:
            for r in pending:
                try:
                    if groups:
                        os.killpg(r.pid, signal.SIGKILL)
                    else:
                        os.kill(r.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            killed = list(pending)
            deadline = time.monotonic() + 10.0  # SIGKILL is not refused; this only bounds the loop
        elif time.monotonic() >= deadline:
            for r in pending:
                out[r.name] = "could not be stopped"
            break
        time.sleep(_POLL_S)  # step of the polling loop
    for r in killed:
        if out.get(r.name) != "could not be stopped":
            out[r.name] = f"killed after {grace_s:.1f}s"
    for r in records:  # leftovers in the group (a child the process started) go too
        if groups and out.get(r.name) != "not running" and _group_alive(r.pid):
            try:
                os.killpg(r.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return out


def _outcome(code: int | None, default: str) -> str:
    """"ok" for a clean exit (0, or death by our SIGTERM: 143 is the JVM's way), else "exit N"."""
    if code is None or code in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        return default
    return f"exit {code}"


def _reap(pid: int) -> int | None:
    """The exit code of our own exited child ``pid`` (collected: no zombie left), or None
    when it runs, was collected already, or is not our child."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if got == pid else None


def stop_groups(records: Sequence[ProcessRecord]) -> list[list[ProcessRecord]]:
    """The stop order: reverse start order, consecutive processes of one role in one group
    (stopped together). Pure. For [zookeeper, redis, shard-0, shard-1, frontend]:
    [[frontend], [shard-1, shard-0], [redis], [zookeeper]].
    """
    groups: list[list[ProcessRecord]] = []
    for r in reversed(records):
        if groups and groups[-1][0].role == r.role:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


# -- signals ---------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """The launcher got SIGINT, SIGTERM or SIGHUP. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """Context manager: while active, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the
    main thread, except inside ``deferred()`` (raised when it ends) and ``shielded()`` (noted
    on stderr and ignored). Restores the previous handlers on exit. Main thread only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, err: IO[str] | None = None) -> None:
        self._err = err or sys.stderr
        self._old: dict[int, Any] = {}
        self._depth = 0
        self._pending: int | None = None
        self._shielded = False

    def __enter__(self) -> "SignalGuard":
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        if self._shielded:
            print(f"\n{signal.Signals(signum).name}: already stopping the cluster, please wait", file=self._err, flush=True)
            return
        if self._depth:
            self._pending = self._pending or signum
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold signals for a critical section (start a child and record it)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending is not None:
                signum, self._pending = self._pending, None
                raise Interrupted(signum)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Ignore signals (with a note) for a section that must finish (stopping the cluster)."""
        before = self._shielded
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = before


def stop_recorded(state: ClusterState, grace_s: float, progress: Progress) -> bool:
    """Stop every process of ``state`` in stop order (``stop_groups``), printing one line per
    process. Returns True when none is left running."""
    for group in stop_groups(state.processes):
        names = ", ".join(f"{r.name} (pid {r.pid})" for r in group)
        with progress.step(f"stopping {names}") as note:
            outcome = stop_processes(group, grace_s)
            odd = {k: v for k, v in outcome.items() if v != "ok"}
            if odd:
                note["detail"] = "(" + ", ".join(f"{k}: {v}" for k, v in odd.items()) + ")"
    left = [p.name for p in state.processes if process_alive(p)]
    if left:
        progress.line(f"still running: {', '.join(left)}")
    return not left


def parse_ready(text: str, role: str) -> str | None:
    """The address in the first ``READY <role> <addr>`` line of a process's output, or None."""
    m = re.search(rf"^READY {re.escape(role)} (\S+)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def parse_metrics(text: str, role: str) -> list[str]:
    """The addresses of every ``METRICS <role> <addr>`` line (one per frontend worker)."""
    return re.findall(rf"^METRICS {re.escape(role)} (\S+)\s*$", text, re.MULTILINE)


def worker_metrics(text: str) -> dict[str, str]:
    """A ``--workers`` frontend's record update: every worker's /metrics endpoint, comma-separated
    (``{}`` for a single process, whose endpoint the launcher chose)."""
    workers = parse_metrics(text, "frontend")
    return {"metrics": ",".join(workers)} if len(workers) > 1 else {}


def parse_http(text: str) -> str:
    """The REST address in a frontend's ``HTTP frontend <addr>`` line, or ""."""
    m = re.search(r"^HTTP frontend (\S+)\s*$", text, re.MULTILINE)
    return m.group(1) if m else ""


def read_log(path: Path) -> str:
    """A child's log so far ("" when it cannot be read yet)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
