"""The state file ``<workdir>/cluster.json``: every process of a local cluster, written the
moment it starts, so ``shardrec cluster down`` finds them all (docs/local-cluster.md)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.core.errors import ConfigError

STATE_FILE = "cluster.json"
STATE_FORMAT = "shardrec.local-cluster/v1"

ROLE_ZOOKEEPER = "zookeeper"
ROLE_REDIS = "redis"
ROLE_SHARD = "shard"
ROLE_FRONTEND = "frontend"
ROLE_JOB = "job"  # a one-shot command (model synth, placement init, features load)
ROLE_LAUNCHER = "launcher"
ROLE_PROMETHEUS = "prometheus"


@dataclass(frozen=True)
class ProcessRecord:
    """One process of the cluster: enough to find it again (pid + start time) and to show it."""

    name: str  # zookeeper, redis, shard-0, frontend, placement-init, ...
    role: str  # one of the ROLE_* names
    pid: int
    started_at: float  # the process's start time (psutil create_time), guards against pid reuse
    log: str = ""
    address: str = ""  # host:port once known
    metrics: str = ""  # host:port of its Prometheus /metrics endpoint, if it serves one (a comma-separated list: frontend workers)

    @property
    def metrics_endpoints(self) -> tuple[str, ...]:
        """Every /metrics endpoint of the process (one per worker of a ``--workers`` frontend)."""
        return tuple(a for a in self.metrics.split(",") if a)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ProcessRecord":
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            pid=int(d["pid"]),
            started_at=float(d["started_at"]),
            log=str(d.get("log", "")),
            address=str(d.get("address", "")),
            metrics=str(d.get("metrics", "")),
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
    http: str = ""  # the frontend's REST endpoint, host:port
    # docs/security.md: the CA clients trust (TLS on), the caller and admin token files (auth on)
    tls_ca: str = ""
    token_file: str = ""
    admin_token_file: str = ""
    zk_auth: str = ""  # the admin's ZooKeeper credentials (auth on)
    prometheus: str = ""  # the Prometheus server's URL (``cluster up --prometheus``)
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
                http=str(d.get("http", "")),
                tls_ca=str(d.get("tls_ca", "")),
                token_file=str(d.get("token_file", "")),
                admin_token_file=str(d.get("admin_token_file", "")),
                zk_auth=str(d.get("zk_auth", "")),
                prometheus=str(d.get("prometheus", "")),
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
