"""The local cluster: a real ZooKeeper, a real Redis, N shard processes and a frontend on
loopback, started by one command (``shardrec demo``, ``shardrec cluster up|status|down``).

Bring-up order (``LocalCluster.start``), each step with a deadline and a progress line:

1. the demo model under ``<workdir>/model/<preset>-seed<seed>/`` (``shardrec model synth``), or
   the complete one already there;
2. ZooKeeper (fresh data each time) and Redis on free loopback ports;
3. N shard processes (``shardrec shard serve --node-id shard-K --torch-threads 1``), then
   ``shardrec placement init`` while they import torch; then every shard must register in
   ZooKeeper (a shard that exits or misses the deadline fails the start, with its log tail);
4. ``shardrec features load`` into Redis, then ``shardrec frontend serve`` until it prints
   ``READY frontend <addr>`` (skipped with ``shards_only``).

Stop order is the reverse: frontend, shards (SIGTERM to all, then wait), Redis, ZooKeeper.
Each process gets SIGTERM, ``stop_grace_s`` to exit, then SIGKILL to its whole process group.

Every child runs in its own session (``start_new_session=True``), logs stdout and stderr to
``<workdir>/logs/<name>.log``, and is written to the **state file** ``<workdir>/cluster.json``
the moment it is started (``ClusterState``: pids with their start times, ports, addresses,
cluster name, workdir). So whatever happens to the launcher, ``shardrec cluster down`` finds
and stops every process (a start time that does not match means the pid was reused: that
process is left alone). ``shardrec demo`` removes the file after stopping everything;
``shardrec cluster up`` leaves it for ``status`` and ``down``.

Signals: ``SignalGuard`` turns SIGINT, SIGTERM and SIGHUP into ``Interrupted`` in the main
thread, defers them while a child is being started and recorded (so no child is ever started
without being recorded), and ignores them (with a note) while the cluster is being stopped.

Threads: everything here runs on the CLI's main thread. Heavy imports (kazoo, grpc, numpy,
psutil) happen inside functions, so ``shardrec --help`` stays light.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from services.core.config import child_env
from services.core.errors import (
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    ShardrecError,
    UnavailableError,
)

if TYPE_CHECKING:
    from kazoo.client import KazooClient

    from services.admin.local_servers import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "cluster.json"
STATE_FORMAT = "shardrec.local-cluster/v1"
DEFAULT_WORKDIR = "var/demo"
DEFAULT_CLUSTER = "local"
DEFAULT_SPEC = "deploy/placement/mixed.json"
DEFAULT_PRESET = "demo"
NUM_CANDIDATES = 100
TOP_K = 10
REQUEST_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 3000
# Step of the polling loops below (each checks a condition; none waits for time to pass).
_POLL_S = 0.05

ROLE_ZOOKEEPER = "zookeeper"
ROLE_REDIS = "redis"
ROLE_SHARD = "shard"
ROLE_FRONTEND = "frontend"
ROLE_JOB = "job"  # a one-shot command (model synth, placement init, features load)
ROLE_LAUNCHER = "launcher"


# -- configuration and state -----------------------------------------------------------------


@dataclass(frozen=True)
class LocalClusterConfig:
    """What ``shardrec demo`` / ``shardrec cluster up`` start. Paths are absolute."""

    workdir: Path
    spec: Path
    preset: str = DEFAULT_PRESET
    nodes: int = 3
    seed: int = 0
    cluster: str = DEFAULT_CLUSTER
    frontend_port: int = 0
    start_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    shards_only: bool = False
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if not self.cluster or "/" in self.cluster:
            raise ConfigError(f"--cluster must be non-empty and contain no '/', got {self.cluster!r}")
        if self.start_timeout_s <= 0 or self.stop_grace_s < 0:
            raise ConfigError("--start-timeout-s must be > 0 and --stop-grace-s >= 0")

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def checkpoint(self) -> Path:
        """The demo model's checkpoint root; one per preset and seed."""
        return self.workdir / "model" / f"{self.preset}-seed{self.seed}"

    @property
    def redis_prefix(self) -> str:
        return f"{self.cluster}:"


@dataclass(frozen=True)
class ProcessRecord:
    """One process of the cluster: enough to find it again (pid + start time) and to show it."""

    name: str  # zookeeper, redis, shard-0, frontend, placement-init, ...
    role: str  # one of the ROLE_* names
    pid: int
    started_at: float  # the process's start time (psutil create_time), guards against pid reuse
    log: str = ""
    address: str = ""  # host:port once known

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ProcessRecord":
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            pid=int(d["pid"]),
            started_at=float(d["started_at"]),
            log=str(d.get("log", "")),
            address=str(d.get("address", "")),
        )


@dataclass
class ClusterState:
    """The state file ``<workdir>/cluster.json``: the contract between the launcher and
    ``shardrec cluster status|down`` (and the tests that check nothing is left running).

    ``processes`` are in start order; ``down`` stops them in reverse. ``launcher`` is the
    process bringing the cluster up (a ``demo`` for its whole run, an ``up`` until it is
    ready), else None. ``ready`` turns true once everything asked for serves.
    """

    cluster: str
    workdir: str
    mode: str  # "demo" or "up"
    created_at: str
    zk: str = ""
    redis_url: str = ""
    redis_prefix: str = ""
    checkpoint: str = ""
    frontend: str = ""
    ready: bool = False
    launcher: ProcessRecord | None = None
    processes: list[ProcessRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = STATE_FORMAT
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ClusterState":
        if d.get("format") != STATE_FORMAT:
            raise ConfigError(f"state file format must be {STATE_FORMAT!r}, got {d.get('format')!r}")
        try:
            return cls(
                cluster=str(d["cluster"]),
                workdir=str(d["workdir"]),
                mode=str(d["mode"]),
                created_at=str(d.get("created_at", "")),
                zk=str(d.get("zk", "")),
                redis_url=str(d.get("redis_url", "")),
                redis_prefix=str(d.get("redis_prefix", "")),
                checkpoint=str(d.get("checkpoint", "")),
                frontend=str(d.get("frontend", "")),
                ready=bool(d.get("ready", False)),
                launcher=None if d.get("launcher") is None else ProcessRecord.from_json(d["launcher"]),
                processes=[ProcessRecord.from_json(p) for p in d.get("processes", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed state file: {e!r}") from e

    def record(self, name: str) -> ProcessRecord | None:
        for p in self.processes:
            if p.name == name:
                return p
        return None


def state_path(workdir: Path | str) -> Path:
    return Path(workdir) / STATE_FILE


def read_state(workdir: Path | str) -> ClusterState | None:
    """The state file of ``workdir``, or None when there is none. ConfigError if unreadable."""
    path = state_path(workdir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return ClusterState.from_json(json.loads(raw))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def write_state(workdir: Path | str, state: ClusterState) -> None:
    """Replace the state file atomically (write a temporary file, then rename)."""
    path = state_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def remove_state(workdir: Path | str) -> None:
    state_path(workdir).unlink(missing_ok=True)


# -- processes by pid ------------------------------------------------------------------------


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


class _NoGuard(SignalGuard):
    """For callers that manage signals themselves (tests calling in-process): no handlers."""

    def __enter__(self) -> "SignalGuard":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# -- progress output -------------------------------------------------------------------------


class Progress:
    """Short progress lines: ``step("starting ZooKeeper on ...")`` prints ``... ok 0.4s``.

    A step prints its head, then ``ok <elapsed>s[ detail]`` on the same line, or on a line of
    its own when other lines were printed meanwhile; ``FAILED after <elapsed>s`` on error.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._open = False  # a step head is printed without its end

    def line(self, text: str = "") -> None:
        if self._open:
            self.out.write("\n")
            self._open = False
        self.out.write(text + "\n")
        self.out.flush()

    @contextmanager
    def step(self, head: str) -> Iterator[dict[str, str]]:
        """Yields a dict; set ``["detail"]`` to append text after ``ok``."""
        if self._open:
            self.out.write("\n")
        self.out.write(f"{head} ... ")
        self.out.flush()
        self._open = True
        note: dict[str, str] = {}
        t0 = time.monotonic()
        try:
            yield note
        except KeyboardInterrupt:
            self._end(f"interrupted after {time.monotonic() - t0:.1f}s")
            raise
        except BaseException:
            self._end(f"FAILED after {time.monotonic() - t0:.1f}s")
            raise
        detail = note.get("detail", "")
        self._end(f"ok {time.monotonic() - t0:.1f}s" + (f" {detail}" if detail else ""))

    def _end(self, text: str) -> None:
        if not self._open:
            text = f"  ... {text}"
        self.out.write(text + "\n")
        self.out.flush()
        self._open = False


# -- pure helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRequest:
    user_id: int
    candidate_item_ids: tuple[int, ...]


def sample_requests(num_users: int, num_items: int, n: int, seed: int, num_candidates: int = NUM_CANDIDATES) -> list[SampleRequest]:
    """``n`` requests for the demo: a power-law user id in ``[0, num_users)`` and
    ``min(num_candidates, num_items)`` distinct candidate items drawn from the model's item
    distribution (``services.core.synth.power_law_ids``: low ids are hot), in draw order.
    Deterministic per seed."""
    import numpy as np

    from services.core.synth import power_law_ids

    rng = np.random.default_rng(seed)
    want = min(num_candidates, num_items)
    out = []
    for _ in range(n):
        user = int(power_law_ids(rng, 1, num_users)[0])
        chosen: dict[int, None] = {}
        for _attempt in range(64):
            for item in power_law_ids(rng, 4 * want, num_items).tolist():
                chosen.setdefault(item)
                if len(chosen) == want:
                    break
            if len(chosen) == want:
                break
        for item in range(num_items):  # a tiny table: fill with the remaining ids, in order
            if len(chosen) == want:
                break
            chosen.setdefault(item)
        out.append(SampleRequest(user, tuple(chosen)))
    return out


def format_response(
    index: int,
    total: int,
    request: SampleRequest,
    items: Sequence[tuple[int, float]],
    latency_ms: float,
    version: int,
    shard_map_version: int,
) -> str:
    """A served request, readably: who, how many candidates, latency, versions, then the
    ranked items one per line. Pure."""
    lines = [
        f"request {index}/{total}: user {request.user_id}, {len(request.candidate_item_ids)} candidates"
        f" -> top {len(items)} in {latency_ms:.1f} ms (version {version}, shard map {shard_map_version})"
    ]
    width = max((len(str(item)) for item, _ in items), default=1)
    for rank, (item, score) in enumerate(items, 1):
        lines.append(f"  {rank:>3}. item {item:>{width}}  score {score:.4f}")
    return "\n".join(lines)


def parse_ready(text: str, role: str) -> str | None:
    """The address in the first ``READY <role> <addr>`` line of a process's output, or None."""
    m = re.search(rf"^READY {re.escape(role)} (\S+)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def call_instructions(state: ClusterState, workdir_arg: str) -> str:
    """How to call a running cluster and stop it (printed by ``cluster up`` and ``status``)."""
    lines = []
    if state.frontend:
        addr = state.frontend
        lines += [
            f"Recommender at {addr} (cluster {state.cluster!r}, ZooKeeper {state.zk}, Redis {state.redis_url})",
            "",
            "call it with grpcurl (reflection is on):",
            f"  grpcurl -plaintext -d '{{\"user_id\": 42, \"candidate_item_ids\": [1, 2, 3, 5, 8, 13, 21], \"top_k\": 5}}' \\",
            f"    {addr} shardrec.v1.Recommender/Recommend",
            "",
            "or from Python (.venv/bin/python in the repository):",
            "  import grpc",
            "  from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc",
            f"  stub = recommend_pb2_grpc.RecommenderStub(grpc.insecure_channel(\"{addr}\"))",
            "  reply = stub.Recommend(recommend_pb2.RecommendRequest(user_id=42, candidate_item_ids=range(100), top_k=10), timeout=5)",
            "  print([(i.item_id, round(i.score, 4)) for i in reply.items], reply.version, reply.shard_map_version)",
            "",
        ]
    else:
        lines += [f"cluster {state.cluster!r} without a frontend: ZooKeeper {state.zk}, Redis {state.redis_url} (prefix {state.redis_prefix!r})", ""]
    lines += [
        f"inspect: shardrec cluster status --workdir {workdir_arg}",
        f"         shardrec placement show --zk {state.zk} --cluster {state.cluster}",
        f"logs:    {Path(state.workdir) / 'logs'}/",
        f"stop:    shardrec cluster down --workdir {workdir_arg}",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ZkView:
    """What ZooKeeper says about a cluster (read by ``cluster status``)."""

    model: Mapping[str, Any] | None
    serving_version: int | None
    map_version: int | None
    map_nodes: tuple[str, ...]
    partitions_of: Mapping[str, tuple[str, ...]]
    nodes: Mapping[str, Mapping[str, Any]]
    frontends: Mapping[str, Mapping[str, Any]]


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_processes(state: ClusterState, alive: Mapping[str, bool]) -> str:
    """One row per process of the state file: name, pid, running or not, address, log. Pure."""
    rows = [("PROCESS", "PID", "STATE", "ADDRESS", "LOG")]
    for p in state.processes:
        rows.append((p.name, str(p.pid), "running" if alive.get(p.name) else "NOT RUNNING", p.address or "-", p.log or "-"))
    return "\n".join(_table(rows))


def format_zk_view(view: ZkView) -> str:
    """Live nodes with their partitions and versions, the map version, live frontends. Pure."""
    model = view.model or {}
    lines = [
        f"  model {model.get('name', '?')!r} at {model.get('uri', '?')}, serving version "
        f"{'-' if view.serving_version is None else view.serving_version}, active shard map version "
        f"{'-' if view.map_version is None else view.map_version}"
    ]
    rows = [("NODE", "LIVE", "ADDRESS", "READY", "SERVING", "MAP", "PARTITIONS")]
    for node in list(view.map_nodes) + sorted(set(view.nodes) - set(view.map_nodes)):
        d = view.nodes.get(node)
        parts = " ".join(d.get("partitions", [])) if d else " ".join(view.partitions_of.get(node, ()))
        if d is None:
            rows.append((node, "no", "-", "-", "-", "-", f"(owns {parts or '-'})"))
        else:
            ready = ",".join(str(v) for v in d.get("versions_ready", [])) or "-"
            rows.append(
                (node, "yes", str(d.get("address", "?")), ready, str(d.get("serving_version", "-")), str(d.get("map_version", "-")), parts or "-")
            )
    lines += _table(rows)
    if view.frontends:
        lines.append(
            "  frontends: "
            + ", ".join(f"{fid} ({d.get('address', '?')}, version {d.get('version', '?')})" for fid, d in sorted(view.frontends.items()))
        )
    else:
        lines.append("  frontends: (none live)")
    return "\n".join(lines)


def resolve_spec(spec: str) -> Path:
    """The placement spec file: as given, else relative to the repository root (so the
    default works from any directory). ConfigError naming both places if neither exists."""
    p = Path(spec)
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return (REPO_ROOT / p).resolve()
    raise ConfigError(f"placement spec {spec!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def cli_has_command(*words: str) -> bool:
    """True when ``shardrec <words...>`` is a registered command of this checkout."""
    import argparse

    from services.admin.cli import build_parser

    parser: argparse.ArgumentParser = build_parser()
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            return False
        parser = subs[0].choices[word]
    return True


def existing_model(root: Path, preset: str) -> tuple[int, str] | None:
    """(version, "") when ``root`` holds a complete demo model of ``preset`` (a complete
    version whose model spec is the preset's, and both feature files); (0, why not) when
    something else is there; None when ``root`` does not exist."""
    from services.core import synth
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    if not root.exists():
        return None
    try:
        reader = CheckpointReader(str(root))
        version = reader.latest_version()
        manifest = reader.manifest(version)
    except CheckpointError as e:
        return 0, str(e)
    if manifest.model != synth.model_spec(preset):
        return 0, f"version {version} is not the {preset!r} preset"
    for side in ("user", "item"):
        if not reader.store.exists(synth.feature_file(side)):
            return 0, f"{synth.feature_file(side)} is missing"
    return version, ""


# -- the cluster -----------------------------------------------------------------------------


class LocalCluster:
    """Starts one local cluster and stops it (see the module docstring for the order).

    Owns the processes it starts (each recorded in the state file as it starts), the server
    objects of ZooKeeper and Redis, and a kazoo client used to watch registrations. Main
    thread only. Use as::

        with SignalGuard() as guard:
            cluster = LocalCluster(config, sys.stdout, guard, mode="demo")
            try:
                cluster.start()
                cluster.send_sample_requests(5, seed=0)
            finally:
                cluster.stop()
    """

    def __init__(self, config: LocalClusterConfig, out: IO[str], guard: SignalGuard, *, mode: str) -> None:
        self.config = config
        self.progress = Progress(out)
        self.guard = guard
        self.mode = mode
        self.state = ClusterState(
            cluster=config.cluster,
            workdir=str(config.workdir),
            mode=mode,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            redis_prefix=config.redis_prefix,
            checkpoint=str(config.checkpoint),
            launcher=ProcessRecord("launcher", ROLE_LAUNCHER, os.getpid(), process_start_time(os.getpid())),
        )
        self._servers: list["ServerProcess"] = []
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._zk: "KazooClient | None" = None
        self._state_written = False

    # -- bring-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Bring the cluster up; returns once it serves (or, with ``shards_only``, once every
        shard registered). Raises ShardrecError naming the failed step (with a log tail) or
        Interrupted; the caller then calls ``stop()``."""
        cfg = self.config
        self._claim_workdir()
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        self._ensure_model()

        from services.admin.local_servers import RedisServer, ZkServer

        zk_dir = cfg.workdir / "zookeeper"
        shutil.rmtree(zk_dir, ignore_errors=True)  # a fresh cluster: no shard map from a past run
        zk = ZkServer(zk_dir, log_path=self._fresh_log("zookeeper"))
        self._start_server(zk, f"starting ZooKeeper on {zk.hosts}", ROLE_ZOOKEEPER, zk.hosts)
        self.state.zk = zk.hosts
        redis = RedisServer(cfg.workdir / "redis", log_path=self._fresh_log("redis"))
        self._start_server(redis, f"starting Redis on 127.0.0.1:{redis.port}", ROLE_REDIS, f"127.0.0.1:{redis.port}")
        self.state.redis_url = redis.url
        self._save()

        from services.core.clients import make_kazoo
        from services.core.config import ZkConfig

        self._zk = make_kazoo(ZkConfig(hosts=zk.hosts, cluster=cfg.cluster, connect_timeout_s=10.0))

        shard_ids = [f"shard-{k}" for k in range(cfg.nodes)]
        t_shards = time.monotonic()
        for node in shard_ids:
            with self.progress.step(f"starting {node}") as note:
                pid = self._spawn(
                    node, ROLE_SHARD,
                    ["shard", "serve", "--node-id", node, "--zk", zk.hosts, "--cluster", cfg.cluster,
                     "--host", "127.0.0.1", "--port", "0", "--torch-threads", "1"],
                )  # fmt: skip
                note["detail"] = f"(pid {pid})"
        self._run_job(
            "placement-init",
            f"placement init ({cfg.spec.name}, {cfg.nodes} nodes, cluster {cfg.cluster!r})",
            ["placement", "init", "--checkpoint", str(cfg.checkpoint), "--nodes", str(cfg.nodes),
             "--spec", str(cfg.spec), "--zk", zk.hosts, "--cluster", cfg.cluster],
        )  # fmt: skip
        self._wait_shards(shard_ids, t_shards)

        if cfg.shards_only:
            self.state.ready = True
            self._save()
            return
        self._require_command("features", "load")
        self._run_job(
            "features-load",
            f"loading feature rows into Redis (prefix {cfg.redis_prefix!r})",
            ["features", "load", "--checkpoint", str(cfg.checkpoint), "--redis", redis.url, "--prefix", cfg.redis_prefix],
        )
        self._require_command("frontend", "serve")
        self._start_frontend(zk.hosts, redis.url)
        self.state.ready = True
        self._save()

    def _claim_workdir(self) -> None:
        """Refuse a workdir whose cluster still runs; drop the state file of a dead one."""
        old = read_state(self.config.workdir)
        if old is None:
            return
        live = [p.name for p in old.processes if process_alive(p)]
        if old.launcher is not None and process_alive(old.launcher) and old.launcher.pid != os.getpid():
            live.insert(0, f"launcher (pid {old.launcher.pid})")
        if live:
            raise FailedPreconditionError(
                f"a local cluster from {state_path(self.config.workdir)} is still running ({', '.join(live)}); "
                f"stop it with `shardrec cluster down --workdir {self.config.workdir}` or use another --workdir"
            )
        remove_state(self.config.workdir)
        self.progress.line(f"removed the state file of a cluster that no longer runs ({state_path(self.config.workdir)})")

    def _ensure_model(self) -> None:
        cfg = self.config
        root = cfg.checkpoint
        found = existing_model(root, cfg.preset)
        if found is not None and found[0] > 0:
            self.progress.line(f"using the demo model in {root} (preset {cfg.preset}, seed {cfg.seed}, version {found[0]})")
            return
        if found is not None:
            self.progress.line(f"discarding the incomplete model in {root}: {found[1]}")
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        self._run_job(
            "model-synth",
            f"generating the demo model (preset {cfg.preset}, seed {cfg.seed}) in {root}",
            ["model", "synth", "--out", str(root), "--preset", cfg.preset, "--seed", str(cfg.seed)],
        )

    def _start_server(self, server: "ServerProcess", head: str, role: str, address: str) -> None:
        self._servers.append(server)
        with self.progress.step(head) as note:
            with self.guard.deferred():
                pid = server.launch()
                self._add_record(ProcessRecord(server.name, role, pid, process_start_time(pid), str(server.log_path), address))
            server.wait_ready()
            note["detail"] = f"(pid {pid})"

    def _wait_shards(self, shard_ids: Sequence[str], t0: float) -> None:
        """Wait until every shard registered in ZooKeeper; fail fast when one exits."""
        from services.core.discovery.shard_map_store import ShardMapStore
        from services.core.discovery.zk_paths import ZkPaths

        assert self._zk is not None
        store = ShardMapStore(self._zk, ZkPaths(self.config.cluster))
        deadline = t0 + self.config.start_timeout_s
        pending = list(shard_ids)
        with self.progress.step(f"waiting for {len(shard_ids)} shards to load and register in ZooKeeper"):
            while pending:
                live = store.live_nodes()
                for node in list(pending):
                    d = live.get(node)
                    if d is not None:
                        pending.remove(node)
                        self._set_address(node, str(d.get("address", "")))
                        parts = d.get("partitions", [])
                        self.progress.line(
                            f"  {node} registered at {d.get('address', '?')} ({time.monotonic() - t0:.1f}s after start): "
                            f"{len(parts)} partitions ({' '.join(parts)}), versions ready {d.get('versions_ready', [])}"
                        )
                    else:
                        self._check_alive(node, f"{node} exited before it registered")
                if pending and time.monotonic() >= deadline:
                    tails = "\n".join(self._tail(n) for n in pending)
                    raise DeadlineExceededError(
                        f"{', '.join(pending)} did not register in ZooKeeper within {self.config.start_timeout_s:.0f}s "
                        f"(--start-timeout-s)\n{tails}"
                    )
                if pending:
                    time.sleep(_POLL_S)  # step of the polling loop

    def _start_frontend(self, zk_hosts: str, redis_url: str) -> None:
        address = self.start_frontend("frontend")
        self.state.frontend = address
        self._save()

    def start_frontend(self, name: str, extra_args: Sequence[str] = (), port: int | None = None) -> str:
        """Start one more frontend process ``name`` over this cluster's ZooKeeper and Redis
        (``extra_args`` are further ``frontend serve`` flags, e.g. ``--lookup inproc``); it is
        recorded like every child and stopped by ``stop()``. Returns its address once READY."""
        cfg = self.config
        with self.progress.step(f"starting {name}") as note:
            pid = self._spawn(
                name, ROLE_FRONTEND,
                ["frontend", "serve", "--zk", self.state.zk, "--cluster", cfg.cluster, "--redis", self.state.redis_url,
                 "--redis-prefix", cfg.redis_prefix, "--host", "127.0.0.1",
                 "--port", str(cfg.frontend_port if port is None else port), "--torch-threads", "1",
                 "--frontend-id", name, *extra_args],
            )  # fmt: skip
            deadline = time.monotonic() + cfg.start_timeout_s
            log = cfg.logs_dir / f"{name}.log"
            while True:
                address = parse_ready(_read(log), "frontend")
                if address:
                    break
                self._check_alive(name, f"{name} exited before it was READY")
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"{name} did not print READY within {cfg.start_timeout_s:.0f}s (--start-timeout-s)\n"
                        + self._tail(name)
                    )
                time.sleep(_POLL_S)  # step of the polling loop
            self._set_address(name, address)
            note["detail"] = f"READY at {address} (pid {pid})"
        return address

    def run_job(self, name: str, head: str, cli_args: Sequence[str]) -> None:
        """Run a one-shot ``shardrec`` command against this cluster (see ``_run_job``)."""
        self._run_job(name, head, cli_args)

    def pids(self, *roles: str) -> dict[str, int]:
        """name -> pid of the recorded processes with one of ``roles`` (all when none given)."""
        return {p.name: p.pid for p in self.state.processes if not roles or p.role in roles}

    def _require_command(self, *words: str) -> None:
        if not cli_has_command(*words):
            raise FailedPreconditionError(
                f"`shardrec {' '.join(words)}` is not a command of this checkout (services/admin/cli.py GROUPS); "
                "ZooKeeper, Redis and the shards started fine: `shardrec cluster up --shards-only` stops there."
            )

    # -- children ------------------------------------------------------------------------
    def _fresh_log(self, name: str) -> Path:
        path = self.config.logs_dir / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return path

    def _spawn(self, name: str, role: str, cli_args: Sequence[str]) -> int:
        """Start ``shardrec <cli_args>`` as ``name`` (own session, log file) and record it
        before any signal can interrupt. Returns its pid."""
        log_path = self._fresh_log(name)
        env = child_env(PYTHONUNBUFFERED="1")
        with self.guard.deferred():
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [self.config.python, "-m", "services.admin.cli", *cli_args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self._children[name] = proc
            self._add_record(ProcessRecord(name, role, proc.pid, process_start_time(proc.pid), str(log_path)))
        return proc.pid

    def _run_job(self, name: str, head: str, cli_args: Sequence[str]) -> None:
        """Run a one-shot ``shardrec`` command to completion within ``start_timeout_s``.
        Raises UnavailableError with its log tail if it fails; kills it if interrupted."""
        with self.progress.step(head):
            self._spawn(name, ROLE_JOB, cli_args)
            proc = self._children[name]
            try:
                code = proc.wait(self.config.start_timeout_s)
            except subprocess.TimeoutExpired:
                raise DeadlineExceededError(
                    f"`shardrec {' '.join(cli_args[:2])}` did not finish within {self.config.start_timeout_s:.0f}s "
                    f"(--start-timeout-s)\n{self._tail(name)}"
                ) from None
            finally:
                with self.guard.shielded():
                    if proc.poll() is None:
                        stop_processes([self._record_of(name)], 0.0)
                    self._drop_record(name)
            if code != 0:
                raise UnavailableError(f"`shardrec {' '.join(cli_args[:2])}` failed with exit code {code}\n{self._tail(name)}")

    def _check_alive(self, name: str, what: str) -> None:
        proc = self._children[name]
        if proc.poll() is not None:
            raise UnavailableError(f"{what} (exit code {proc.returncode})\n{self._tail(name)}")

    def _tail(self, name: str) -> str:
        path = self.config.logs_dir / f"{name}.log"
        text = _read(path)[-LOG_TAIL_CHARS:]
        return f"----- last lines of {path}:\n{text.rstrip() or '(empty)'}\n-----"

    # -- state file ----------------------------------------------------------------------
    def _add_record(self, record: ProcessRecord) -> None:
        self.state.processes.append(record)
        self._save()

    def _record_of(self, name: str) -> ProcessRecord:
        r = self.state.record(name)
        assert r is not None, name
        return r

    def _drop_record(self, name: str) -> None:
        self.state.processes = [p for p in self.state.processes if p.name != name]
        self._save()

    def _set_address(self, name: str, address: str) -> None:
        self.state.processes = [replace(p, address=address) if p.name == name else p for p in self.state.processes]
        self._save()

    def _save(self) -> None:
        write_state(self.config.workdir, self.state)
        self._state_written = True

    def detach(self) -> None:
        """Leave the cluster running (``cluster up``): the state file says the launcher is gone."""
        self._close_zk()
        self.state.launcher = None
        self._save()

    # -- requests --------------------------------------------------------------------------
    def send_sample_requests(self, n: int, seed: int) -> int:
        """Send ``n`` Recommend calls (power-law users, ``NUM_CANDIDATES`` candidates each) to
        the frontend and print each response. Returns the number of failed calls."""
        if n <= 0:
            return 0
        import grpc

        from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
        from services.core.checkpoint.reader import CheckpointReader

        reader = CheckpointReader(str(self.config.checkpoint))
        model = reader.manifest(reader.latest_version()).model
        requests = sample_requests(model.table("users").rows, model.table("items").rows, n, seed)
        failures = 0
        self.progress.line()
        with grpc.insecure_channel(self.state.frontend) as channel:
            stub = recommend_pb2_grpc.RecommenderStub(channel)
            for i, req in enumerate(requests, 1):
                msg = recommend_pb2.RecommendRequest(
                    request_id=f"demo-{i}", user_id=req.user_id, candidate_item_ids=list(req.candidate_item_ids), top_k=TOP_K
                )
                t0 = time.perf_counter()
                try:
                    reply = stub.Recommend(msg, timeout=REQUEST_TIMEOUT_S)
                except grpc.RpcError as e:
                    failures += 1
                    self.progress.line(f"request {i}/{n}: user {req.user_id}: FAILED {e.code().name}: {e.details()}")
                    continue
                latency_ms = (time.perf_counter() - t0) * 1000
                items = [(int(s.item_id), float(s.score)) for s in reply.items]
                self.progress.line(
                    format_response(i, n, req, items, latency_ms, int(reply.version), int(reply.shard_map_version))
                )
        self.progress.line()
        return failures

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop everything this launcher started, in reverse order; remove the state file.
        Signals are ignored meanwhile. Returns True when nothing is left running."""
        with self.guard.shielded():
            self._close_zk()
            ok = stop_recorded(self.state, self.config.stop_grace_s, self.progress)
            for server in self._servers:  # never recorded only if launch() itself failed
                server.close()
            for proc in self._children.values():
                proc.poll()  # reap
            if ok and self._state_written:
                remove_state(self.config.workdir)
            return ok

    def _close_zk(self) -> None:
        if self._zk is not None:
            try:
                self._zk.stop()
                self._zk.close()
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass
            self._zk = None


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


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- status and down (by state file) ---------------------------------------------------------


def read_zk_view(zk_hosts: str, cluster: str, connect_timeout_s: float = 5.0) -> ZkView:
    """Read a cluster's view from ZooKeeper. UnavailableError when it does not answer."""
    from services.core.clients import make_kazoo
    from services.core.config import ZkConfig
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.discovery.zk_paths import ZkPaths
    from services.core.errors import NotFoundError

    client = make_kazoo(ZkConfig(hosts=zk_hosts, cluster=cluster, session_timeout_s=5.0, connect_timeout_s=connect_timeout_s))
    try:
        store = ShardMapStore(client, ZkPaths(cluster), timeout_s=connect_timeout_s)

        def maybe(read: Any) -> Any:
            try:
                return read()
            except NotFoundError:
                return None

        found = maybe(store.read_active)
        smap = found[0] if found else None
        return ZkView(
            model=maybe(store.read_model),
            serving_version=maybe(store.read_serving_version),
            map_version=None if smap is None else smap.version,
            map_nodes=() if smap is None else tuple(smap.nodes),
            partitions_of={} if smap is None else {n: tuple(str(k) for k in smap.partitions_of(n)) for n in smap.nodes},
            nodes=store.live_nodes(),
            frontends=store.live_frontends(),
        )
    finally:
        client.stop()
        client.close()


def cluster_status(workdir: Path, workdir_arg: str, out: IO[str]) -> int:
    """Print the processes of the state file and the ZooKeeper view. 0 when every process
    runs, 1 when some do not, 2 when there is no state file."""
    state = read_state(workdir)
    if state is None:
        print(f"no local cluster in {workdir} (no {STATE_FILE}); start one with `shardrec cluster up`", file=out)
        return 2
    alive = {p.name: process_alive(p) for p in state.processes}
    launcher = ""
    if state.launcher is not None and process_alive(state.launcher):
        launcher = f", still starting (launcher pid {state.launcher.pid})"
    print(f"local cluster {state.cluster!r} from {state.mode!r}, started {state.created_at}, workdir {state.workdir}{launcher}", file=out)
    print(format_processes(state, alive), file=out)
    print(file=out)
    if state.zk and alive.get("zookeeper"):
        try:
            view = read_zk_view(state.zk, state.cluster)
        except ShardrecError as e:
            print(f"ZooKeeper {state.zk}: not readable: {e}", file=out)
        else:
            print(f"ZooKeeper {state.zk}, /shardrec/{state.cluster}:", file=out)
            print(format_zk_view(view), file=out)
    else:
        print("ZooKeeper is not running: no cluster view", file=out)
    print(file=out)
    print(call_instructions(state, workdir_arg), file=out)
    return 0 if state.processes and all(alive.values()) else 1


def cluster_down(workdir: Path, grace_s: float, out: IO[str]) -> int:
    """Stop the launcher still starting the cluster (if any), then every process of the state
    file in reverse order; remove the state file. 0 when nothing is left running (also when
    there was no cluster), 1 otherwise."""
    state = read_state(workdir)
    progress = Progress(out)
    if state is None:
        progress.line(f"no local cluster in {workdir} (no {STATE_FILE}): nothing to stop")
        return 0
    if state.launcher is not None and process_alive(state.launcher):
        with progress.step(f"stopping the launcher ({state.mode}, pid {state.launcher.pid})"):
            # It stops its children itself; its group may be the user's shell job: leave that alone.
            stop_processes([state.launcher], grace_s + 30.0, groups=False)
        state = read_state(workdir) or replace(state, processes=[])
    ok = stop_recorded(state, grace_s, progress)
    if ok:
        remove_state(workdir)
        progress.line(f"cluster {state.cluster!r} stopped; logs kept in {Path(state.workdir) / 'logs'}")
        return 0
    progress.line(f"some processes could not be stopped; {state_path(workdir)} kept")
    return 1
