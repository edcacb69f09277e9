"""``shardrec demo`` and ``shardrec cluster up|status|down``: the local cluster.

- ``demo``: generate (or reuse) the demo model, or take ``--checkpoint URI`` (any checkpoint,
  its features or those of ``--features ROOT``, placed by ``--spec`` or by the planner), start
  ZooKeeper, Redis, N shards and a frontend on loopback, send sample Recommend calls and print
  them, then stop everything.
  Exit 0 when every call succeeded; 1 on a failed step or call; 128 + N on signal N.
- ``cluster up``: the same cluster, left running; writes ``<workdir>/cluster.json`` and prints
  how to call and stop it. ``--shards-only`` stops after the shards registered (no features,
  no frontend): for developing a frontend against real shards. ``--prometheus`` also starts
  a Prometheus server scraping every process.
- ``cluster status``: the processes of the state file and what ZooKeeper says.
- ``cluster top``: a live view read from the processes' /metrics (``--once``: one frame).
- ``cluster down``: stop everything in the state file (SIGTERM, then SIGKILL), remove it.

The work is in ``services.localcluster`` (docs/local-cluster.md); this module only parses and
wires. No process this command starts outlives it, except those ``cluster up`` leaves for
``cluster down``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.admin.cmd_model import PRESET_NAMES
from services.localcluster.config import DEFAULT_CLUSTER, DEFAULT_PRESET, DEFAULT_SPEC, DEFAULT_WORKDIR


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="start a local cluster, serve sample requests, print them, stop everything",
        description="Start a real ZooKeeper, Redis, N shard processes and a frontend on loopback ports, "
        "send sample Recommend calls, print them, then stop everything (also on Ctrl-C or error).",
    )
    _cluster_args(demo, requests_default=5)
    demo.set_defaults(func=_demo)

    cluster = subparsers.add_parser("cluster", help="a local cluster left running: up, status, down")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    up = sub.add_parser(
        "up",
        help="start a local cluster and leave it running",
        description="Start the same cluster as `shardrec demo` and leave it running; its state file "
        "<workdir>/cluster.json lists every process. Stop it with `shardrec cluster down`.",
    )
    _cluster_args(up, requests_default=0)
    up.add_argument(
        "--shards-only", action="store_true", help="start ZooKeeper, Redis and the shards only (no features, no frontend)"
    )
    up.add_argument("--prometheus", action="store_true",
                    help="also start a Prometheus server (Debian package) scraping every process, with the alert rules of deploy/prometheus/")
    up.add_argument("--scrape-interval-s", type=float, default=5.0, help="Prometheus scrape interval (default 5)")
    up.set_defaults(func=_up)

    status = sub.add_parser("status", help="show the processes and the ZooKeeper view of a local cluster")
    status.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"the cluster's work directory (default {DEFAULT_WORKDIR})")
    status.set_defaults(func=_status)

    top = sub.add_parser(
        "top",
        help="a live view of a running local cluster, read from its processes' /metrics",
        description="QPS, p50/p99, errors by code, sheds, per shard node Lookup latency and load, versions and the "
        "feature store, refreshed every --interval-s from the /metrics endpoints of the state file's processes.",
    )
    top.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"the cluster's work directory (default {DEFAULT_WORKDIR})")
    top.add_argument("--interval-s", type=float, default=2.0, help="refresh period; rates are over it (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame (rates over --interval-s) and exit, for scripts")
    top.set_defaults(func=_top)

    down = sub.add_parser("down", help="stop every process of a local cluster and remove its state file")
    down.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"the cluster's work directory (default {DEFAULT_WORKDIR})")
    down.add_argument("--stop-grace-s", type=float, default=15.0, help="seconds each process gets after SIGTERM before SIGKILL")
    down.set_defaults(func=_down)


def _cluster_args(p: argparse.ArgumentParser, *, requests_default: int) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, choices=PRESET_NAMES, help=f"demo model sizes (default {DEFAULT_PRESET}, ~0.4 GiB; small for tests)")
    model.add_argument("--checkpoint", default=None, metavar="URI", help="serve this checkpoint root (a path or file:// URI) instead of a demo model")
    p.add_argument("--features", default=None, metavar="ROOT", help="with --checkpoint: load features/{users,items}.npz from this root instead of the checkpoint's")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"model, logs, server data and state file (default {DEFAULT_WORKDIR})")
    p.add_argument("--nodes", type=int, default=3, help="number of shard processes (default 3)")
    p.add_argument(
        "--spec", default=None, help=f"placement spec file (default: {DEFAULT_SPEC} for a preset; the planner's for --checkpoint)"
    )
    p.add_argument("--requests", type=int, default=requests_default, help=f"sample Recommend calls to send and print (default {requests_default})")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model and of the sample requests (default 0)")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help=f"cluster name in ZooKeeper (default {DEFAULT_CLUSTER})")
    p.add_argument("--port", type=int, default=0, help="frontend port (default 0: any free port)")
    p.add_argument("--frontend-workers", type=int, default=1, metavar="N",
                   help="frontend processes behind the one port (frontend serve --workers; docs/workers.md; default 1)")
    p.add_argument("--start-timeout-s", type=float, default=300.0, help="deadline of each start step (default 300)")
    p.add_argument("--stop-grace-s", type=float, default=15.0, help="seconds each process gets after SIGTERM before SIGKILL (default 15)")
    p.add_argument("--tls", action="store_true", help="TLS on every port, mTLS between frontends and shards: a local CA and certificates in <workdir>/pki")
    p.add_argument("--auth", action="store_true",
                   help="bearer tokens, the cluster token, ZooKeeper ACLs and a Redis password (secrets in <workdir>/secrets)")


def _config(args: argparse.Namespace):  # noqa: ANN202
    from services.localcluster.config import LocalClusterConfig, resolve_spec

    spec = args.spec if args.spec is not None or args.checkpoint is not None else DEFAULT_SPEC
    return LocalClusterConfig(
        workdir=Path(args.workdir).resolve(),
        spec=None if spec is None else resolve_spec(spec),
        preset=args.preset or DEFAULT_PRESET,
        checkpoint_uri=args.checkpoint,
        features_root=args.features,
        nodes=args.nodes,
        seed=args.seed,
        cluster=args.cluster,
        frontend_port=args.port,
        start_timeout_s=args.start_timeout_s,
        stop_grace_s=args.stop_grace_s,
        shards_only=getattr(args, "shards_only", False),
        tls=args.tls,
        auth=args.auth,
        prometheus=getattr(args, "prometheus", False),
        scrape_interval_s=getattr(args, "scrape_interval_s", 5.0),
        frontend_args=("--workers", str(args.frontend_workers)) if args.frontend_workers != 1 else (),
    )


def _run(args: argparse.Namespace, *, mode: str) -> int:
    """Bring the cluster up, send the sample requests, and stop it (``demo``) or leave it
    running (``up``, on success only). Signals and errors always end in a full stop."""
    import time

    from services.core.errors import ShardrecError
    from services.localcluster.demo import call_instructions, send_sample_requests
    from services.localcluster.launcher import LocalCluster
    from services.localcluster.processes import Interrupted, SignalGuard

    config = _config(args)
    out = sys.stdout
    t0 = time.monotonic()
    code = 1
    keep = False
    with SignalGuard() as guard:
        cluster = LocalCluster(config, out, guard, mode=mode)
        try:
            cluster.start()
            failures = send_sample_requests(
                cluster.state.frontend, config.checkpoint, args.requests, args.seed, cluster.progress, features=config.features,
                tls_ca=cluster.state.tls_ca, token_file=cluster.state.token_file,
            )
            if failures:
                cluster.progress.line(f"{failures} of {args.requests} requests failed")
            code = 1 if failures else 0
            keep = mode == "up" and code == 0
        except Interrupted as e:
            cluster.progress.line(f"interrupted ({e}): stopping the cluster")
            code = e.exit_code
        except ShardrecError as e:
            cluster.progress.line(f"FAILED: {e}")
            code = 1
        finally:
            if keep:
                cluster.detach()
            else:
                stopped = cluster.stop()
                if not stopped:
                    code = code or 1
    if keep:
        print(f"\ncluster {config.cluster!r} is up ({time.monotonic() - t0:.1f}s); state in {config.workdir / 'cluster.json'}\n")
        print(call_instructions(cluster.state, args.workdir))
    elif code == 0:
        print(f"demo done in {time.monotonic() - t0:.1f}s: {args.requests} requests served; every process stopped; logs in {config.logs_dir}")
    return code


def _demo(args: argparse.Namespace) -> int:
    return _run(args, mode="demo")


def _up(args: argparse.Namespace) -> int:
    return _run(args, mode="up")


def _status(args: argparse.Namespace) -> int:
    from services.localcluster.status import cluster_status

    return cluster_status(Path(args.workdir).resolve(), args.workdir, sys.stdout)


def _top(args: argparse.Namespace) -> int:
    from services.localcluster.top import cluster_top

    return cluster_top(Path(args.workdir).resolve(), interval_s=args.interval_s, once=args.once)


def _down(args: argparse.Namespace) -> int:
    from services.localcluster.processes import SignalGuard
    from services.localcluster.status import cluster_down

    with SignalGuard() as guard, guard.shielded():
        return cluster_down(Path(args.workdir).resolve(), args.stop_grace_s, sys.stdout)
