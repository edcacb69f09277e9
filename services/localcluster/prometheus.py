"""A real Prometheus server (the Debian ``prometheus`` package) for the local cluster: it scrapes
every process of the state file through file-based service discovery (``write_targets`` runs
each time the state file is written, so processes started later are scraped too) and
evaluates the alert rules of ``deploy/prometheus/alerts.yml`` (docs/observability.md).

Not thread-safe: one thread owns each object.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from services.localcluster.config import REPO_ROOT
from services.localcluster.servers import MissingServerError, ServerProcess
from services.localcluster.state import ROLE_FRONTEND, ROLE_SHARD, ClusterState

ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
TARGETS_FILE = "targets.json"
# The ``job`` label per role, as in deploy/ (the alert rules and the dashboard use them).
JOBS = {ROLE_SHARD: "shardrec-shard", ROLE_FRONTEND: "shardrec-frontend"}


def targets(state: ClusterState) -> list[dict]:
    """The file_sd target groups of every process of ``state`` that serves /metrics. Pure."""
    groups = []
    for p in state.processes:
        if p.metrics and p.role in JOBS:
            groups.append({"targets": list(p.metrics_endpoints), "labels": {"job": JOBS[p.role], "process": p.name, "cluster": state.cluster}})
    return groups


def write_targets(path: Path, state: ClusterState) -> None:
    """Replace the targets file atomically (Prometheus watches it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(targets(state), indent=2) + "\n")
    os.replace(tmp, path)


def config_text(targets_path: Path, scrape_interval_s: float, rules: Path | None) -> str:
    """prometheus.yml for the local cluster (YAML written as JSON, which YAML reads). Pure."""
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": "shardrec", "file_sd_configs": [{"files": [str(targets_path)], "refresh_interval": "5s"}]}
        ],
    }
    if rules is not None:
        doc["rule_files"] = [str(rules)]
    return json.dumps(doc, indent=2) + "\n"


class PrometheusServer(ServerProcess):
    """``prometheus`` on loopback: config and data under ``work_dir``, ``url`` its address.
    MissingServerError when the Debian package is not installed."""

    name = "prometheus"
    install_hint = "install the prometheus Debian package (`make setup` does)"

    def __init__(self, work_dir: Path, port: int | None = None, *, scrape_interval_s: float = 5.0, rules: Path | None = ALERT_RULES,
                 log_path: Path | None = None, ready_timeout_s: float = 60.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise MissingServerError(f"Prometheus cannot start: prometheus not found; {self.install_hint}")
        self._binary = binary
        super().__init__(work_dir, port, log_path=log_path, ready_timeout_s=ready_timeout_s)
        self.targets_path = self.work_dir / TARGETS_FILE
        if not self.targets_path.exists():
            self.targets_path.write_text("[]\n")
        self.config_path = self.work_dir / "prometheus.yml"
        self.config_path.write_text(config_text(self.targets_path, scrape_interval_s, rules if rules and rules.exists() else None))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.work_dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def _probe(self, timeout_s: float) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
