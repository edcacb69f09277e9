"""``LocalCluster``: start one local cluster (model, ZooKeeper, Redis, shards, features, a
frontend), each step with a deadline and a progress line, and stop it in reverse order. The
order, the state file and the signal rules are in docs/local-cluster.md.

Main thread only. Heavy imports (kazoo, grpc, numpy, psutil) happen inside functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

from services.core.config import child_env
from services.core.errors import DeadlineExceededError, FailedPreconditionError, UnavailableError
from services.localcluster.config import LocalClusterConfig, existing_model
from services.localcluster.console import Progress
from services.localcluster.prometheus import PrometheusServer, write_targets
from services.localcluster.model import SPEC_FILE, describe_checkpoint, feature_files, write_planned_spec
from services.localcluster.security import LocalSecurity
from services.localcluster.processes import (
    SignalGuard,
    parse_http,
    parse_ready,
    process_alive,
    process_start_time,
    read_log,
    shardrec_argv,
    stop_processes,
    stop_recorded,
    worker_metrics,
)
from services.localcluster.state import (
    ROLE_FRONTEND,
    ROLE_JOB,
    ROLE_LAUNCHER,
    ROLE_PROMETHEUS,
    ROLE_REDIS,
    ROLE_SHARD,
    ROLE_ZOOKEEPER,
    ClusterState,
    ProcessRecord,
    read_state,
    remove_state,
    state_path,
    write_state,
)

if TYPE_CHECKING:
    from kazoo.client import KazooClient

    from services.localcluster.servers import ServerProcess

LOG_TAIL_CHARS = 3000
# Step of the polling loops below (each checks a condition; none waits for time to pass).
_POLL_S = 0.05


class LocalCluster:
    """Starts one local cluster and stops it (docs/local-cluster.md tells the order).

    Owns the processes it starts (each recorded in the state file as it starts), the server
    objects of ZooKeeper and Redis, and a kazoo client used to watch registrations. Main
    thread only. Use as::

        with SignalGuard() as guard:
            cluster = LocalCluster(config, sys.stdout, guard, mode="demo")
            try:
                cluster.start()
                send_sample_requests(cluster.state.frontend, config.checkpoint, 5, 0, cluster.progress)
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
        self.security = LocalSecurity(config)
        self._targets: Path | None = None  # Prometheus's file_sd targets, rewritten with the state
        self._feature_store = True  # False: the model has no feature files, frontends get no --redis

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
        spec = self._placement_spec()
        for made in self.security.prepare():
            self.progress.line(f"made {made}")
        for key, value in self.security.client().items():
            setattr(self.state, key, value)

        from services.localcluster.servers import RedisServer, ZkServer

        zk_dir = cfg.workdir / "zookeeper"
        shutil.rmtree(zk_dir, ignore_errors=True)  # a fresh cluster: no shard map from a past run
        zk = ZkServer(zk_dir, log_path=self._fresh_log("zookeeper"))
        self._start_server(zk, f"starting ZooKeeper on {zk.hosts}", ROLE_ZOOKEEPER, zk.hosts)
        self.state.zk = zk.hosts
        redis_dir = cfg.workdir / "redis"
        shutil.rmtree(redis_dir, ignore_errors=True)  # fresh, like ZooKeeper: no features of a past run
        redis = RedisServer(redis_dir, persistence=True, log_path=self._fresh_log("redis"), password=self.security.redis_password)
        self._start_server(redis, f"starting Redis on 127.0.0.1:{redis.port}", ROLE_REDIS, f"127.0.0.1:{redis.port}")
        self.state.redis_url = redis.url
        if cfg.prometheus:
            prom = PrometheusServer(cfg.workdir / "prometheus", scrape_interval_s=cfg.scrape_interval_s, log_path=self._fresh_log("prometheus"))
            self._targets = prom.targets_path
            self._start_server(prom, f"starting Prometheus on {prom.url}", ROLE_PROMETHEUS, f"127.0.0.1:{prom.port}")
            self.state.prometheus = prom.url
        self._save()

        from services.core.clients import make_kazoo
        from services.core.config import ZkConfig, load_zk_auth

        self._zk = make_kazoo(ZkConfig(hosts=zk.hosts, cluster=cfg.cluster, connect_timeout_s=10.0,
                                       auth=load_zk_auth(self.security.admin_zk_auth)))  # fmt: skip

        shard_ids = [f"shard-{k}" for k in range(cfg.nodes)]
        t_shards = time.monotonic()
        for node in shard_ids:
            with self.progress.step(f"starting {node}") as note:
                pid = self._spawn(
                    node, ROLE_SHARD,
                    ["shard", "serve", "--node-id", node, "--zk", zk.hosts, "--cluster", cfg.cluster,
                     "--host", "127.0.0.1", "--port", "0", "--torch-threads", "1", *self.security.serve_flags("shard", node),
                     *cfg.service_args, *cfg.shard_args],
                    metrics=cfg.metrics,
                )  # fmt: skip
                note["detail"] = f"(pid {pid})"
        self._run_job(
            "placement-init",
            f"placement init ({spec.name}, {cfg.nodes} nodes, cluster {cfg.cluster!r})",
            ["placement", "init", "--checkpoint", str(cfg.checkpoint), "--nodes", str(cfg.nodes),
             "--spec", str(spec), "--zk", zk.hosts, "--cluster", cfg.cluster, *self.security.job_flags("placement")],
        )  # fmt: skip
        self._wait_shards(shard_ids, t_shards)

        if cfg.shards_only:
            self.state.ready = True
            self._save()
            return
        self.load_features()
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
        if cfg.checkpoint_uri is not None:
            _version, what = describe_checkpoint(cfg.checkpoint_uri)
            self.progress.line(f"serving the checkpoint {cfg.checkpoint_uri}: {what}")
            return
        root = Path(cfg.checkpoint)
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

    def _placement_spec(self) -> Path:
        """The spec file to place the model with: the given one, else the planner's, written
        to ``<workdir>/placement.json``."""
        cfg = self.config
        if cfg.spec is not None:
            return cfg.spec
        path = cfg.workdir / SPEC_FILE
        shapes = write_planned_spec(str(cfg.checkpoint), cfg.nodes, path)
        self.progress.line(f"placement planned for {cfg.nodes} nodes (no --spec), written to {path}: {shapes}")
        return path

    def load_features(self) -> None:
        """``features load`` of the model's feature files (``start`` does it; with ``shards_only``
        the caller may); none at all: a note, and the frontends run without a feature store,
        every entity with the manifest's defaults (docs/features.md)."""
        cfg = self.config
        if not feature_files(cfg.features):
            self.progress.line(f"no features/users.npz or features/items.npz below {cfg.features}: serving every user and item with the defaults")
            self._feature_store = False
            return
        source = [] if cfg.features_root is None else ["--features", cfg.features_root]
        self._run_job(
            "features-load",
            f"loading feature rows into Redis (prefix {cfg.redis_prefix!r})",
            ["features", "load", "--checkpoint", str(cfg.checkpoint), "--redis", self.state.redis_url, "--prefix", cfg.redis_prefix, *source,
             *self.security.job_flags("features")],
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
        from services.core.discovery.cluster_store import ClusterStore
        from services.core.discovery.zk_paths import ZkPaths

        assert self._zk is not None
        store = ClusterStore(self._zk, ZkPaths(self.config.cluster))
        deadline = t0 + self.config.start_timeout_s
        pending = list(shard_ids)
        with self.progress.step(f"waiting for {len(shard_ids)} shards to load and register in ZooKeeper"):
            while pending:
                live = store.live_nodes()
                for node in list(pending):
                    d = live.get(node)
                    if d is not None:
                        pending.remove(node)
                        self._update(node, address=d.address)
                        self.progress.line(
                            f"  {node} registered at {d.address or '?'} ({time.monotonic() - t0:.1f}s after start): "
                            f"{len(d.partitions)} partitions ({' '.join(d.partitions)}), versions ready {list(d.versions_ready)}"
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
        self.state.http = parse_http(read_log(self.config.logs_dir / "frontend.log"))
        self._save()

    def start_frontend(self, name: str, extra_args: Sequence[str] = (), port: int | None = None) -> str:
        """Start one more frontend process ``name`` over this cluster's ZooKeeper and Redis
        (``extra_args`` are further ``frontend serve`` flags, e.g. ``--lookup inproc``); it is
        recorded like every child and stopped by ``stop()``. Returns its address once READY."""
        cfg = self.config
        if not self._feature_store:  # Redis still serves the redis-kv baseline's rows
            store = ["--kv-redis", self.state.redis_url]
        else:  # a lost store is reloaded from where it was loaded
            store = ["--redis", self.state.redis_url, *(["--features", cfg.features_root] if cfg.features_root else [])]
        with self.progress.step(f"starting {name}") as note:
            pid = self._spawn(
                name, ROLE_FRONTEND,
                ["frontend", "serve", "--zk", self.state.zk, "--cluster", cfg.cluster, *store, "--redis-prefix", cfg.redis_prefix,
                 "--host", "127.0.0.1", "--port", str(cfg.frontend_port if port is None else port), "--http-port", "0",
                 "--torch-threads", "1", "--frontend-id", name, *self.security.serve_flags("frontend", name), *cfg.service_args,
                 *cfg.frontend_args, *extra_args],
                metrics=cfg.metrics,
            )  # fmt: skip
            deadline = time.monotonic() + cfg.start_timeout_s
            log = cfg.logs_dir / f"{name}.log"
            while True:
                address = parse_ready(read_log(log), "frontend")
                if address:
                    break
                self._check_alive(name, f"{name} exited before it was READY")
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"{name} did not print READY within {cfg.start_timeout_s:.0f}s (--start-timeout-s)\n"
                        + self._tail(name)
                    )
                time.sleep(_POLL_S)  # step of the polling loop
            self._update(name, address=address, **worker_metrics(read_log(log)))
            note["detail"] = f"READY at {address} (pid {pid})"
        return address

    def run_job(self, name: str, head: str, cli_args: Sequence[str]) -> None:
        """Run a one-shot ``shardrec`` command against this cluster (see ``_run_job``)."""
        self._run_job(name, head, cli_args)

    def pids(self, *roles: str) -> dict[str, int]:
        """name -> pid of the recorded processes with one of ``roles`` (all when none given)."""
        return {p.name: p.pid for p in self.state.processes if not roles or p.role in roles}

    # -- children ------------------------------------------------------------------------
    def _fresh_log(self, name: str) -> Path:
        path = self.config.logs_dir / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return path

    def _spawn(self, name: str, role: str, cli_args: Sequence[str], *, metrics: bool = False) -> int:
        """Start ``shardrec <cli_args>`` as ``name`` (own session, log file) and record it
        before any signal can interrupt; with ``metrics``, on a free ``--metrics-port`` that
        the record names (Prometheus finds it there). Returns its pid."""
        metrics_address = ""
        if metrics:
            from services.localcluster.servers import free_port

            port = free_port()
            metrics_address = f"127.0.0.1:{port}"
            cli_args = [*cli_args, "--metrics-port", str(port)]
        log_path = self._fresh_log(name)
        env = child_env(PYTHONUNBUFFERED="1")
        with self.guard.deferred():
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    shardrec_argv(self.config.python, *cli_args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self._children[name] = proc
            self._add_record(ProcessRecord(name, role, proc.pid, process_start_time(proc.pid), str(log_path), metrics=metrics_address))
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
        text = read_log(path)[-LOG_TAIL_CHARS:]
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

    def _update(self, name: str, **fields: str) -> None:
        self.state.processes = [replace(p, **fields) if p.name == name else p for p in self.state.processes]
        self._save()

    def _save(self) -> None:
        write_state(self.config.workdir, self.state)
        self._state_written = True
        if self._targets is not None:
            write_targets(self._targets, self.state)

    def server(self, name: str) -> "ServerProcess":
        """The ZooKeeper, Redis or Prometheus server this launcher started (to inject faults)."""
        for s in self._servers:
            if s.name == name:
                return s
        raise KeyError(name)

    def detach(self) -> None:
        """Leave the cluster running (``cluster up``): the state file says the launcher is gone."""
        self._close_zk()
        self.state.launcher = None
        self._save()

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
