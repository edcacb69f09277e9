"""``shardrec bench``: the load harness (``benchmarks/harness``) from the command line.

- ``bench compare``: starts a local cluster and measures each system in turn (``benchmarks/compare.py``);
- ``bench run``: drives a running frontend (e.g. one from ``shardrec cluster up``) at a fixed
  rate, with N closed-loop clients, or as a sweep to the saturation point (``benchmarks/drive.py``).
"""

from __future__ import annotations

import argparse

from services.admin.cmd_kv import bench_subcommands


def register(sub: argparse._SubParsersAction) -> None:
    bench = bench_subcommands(sub)

    cmp_ = bench.add_parser("compare", help="start a local cluster and compare systems on one workload")
    cmp_.add_argument("--systems", default="monolith,redis-kv,shardrec,shardrec-nobatch",
                      help="comma-separated: monolith, redis-kv, shardrec, shardrec-nobatch, torchrec")
    cmp_.add_argument("--preset", default="demo", help="model size: small, demo or large")
    cmp_.add_argument("--spec", default="deploy/placement/mixed.json", help="placement of the shardrec systems")
    cmp_.add_argument("--nodes", type=int, default=3, help="shard nodes of the benchmark cluster")
    cmp_.add_argument("--workdir", default="var/bench", help="model, logs and state of the benchmark cluster")
    cmp_.add_argument("--out", default="bench-results/compare", help="folder for compare.json and the plots")
    cmp_.add_argument("--candidates", type=int, default=100, help="candidates per request")
    cmp_.add_argument("--low-rate", type=float, default=50.0, help="open-loop rate of the latency run (req/s)")
    cmp_.add_argument("--cpu-rate", type=float, default=150.0, help="open-loop rate of the CPU and bytes run (req/s)")
    cmp_.add_argument("--duration-s", type=float, default=8.0, help="recorded length of each run")
    cmp_.add_argument("--warmup-s", type=float, default=2.0, help="unrecorded load before each run")
    cmp_.add_argument("--prime-s", type=float, default=5.0, help="unrecorded closed-loop load per system first (cold caches)")
    cmp_.add_argument("--no-sweep", action="store_true", help="skip the saturation sweeps")
    cmp_.add_argument("--sweep-start", type=float, default=100.0, help="first rate of a sweep (req/s)")
    cmp_.add_argument("--sweep-factor", type=float, default=1.15, help="rate multiplier between sweep steps")
    cmp_.add_argument("--sweep-steps", type=int, default=16, help="most steps of a sweep")
    cmp_.add_argument("--sweep-duration-s", type=float, default=5.0, help="length of each sweep step")
    cmp_.add_argument("--slo-ms", type=float, default=50.0, help="p99 SLO that defines saturation")
    cmp_.add_argument("--seed", type=int, default=0, help="seed of the model and the request mix")
    cmp_.add_argument("--frontend-args", default="",
                      help="further flags for every system's frontend, e.g. '--admission off' (CPU comparisons with nothing shed)")
    cmp_.add_argument("--runs", type=int, default=3, help="interleaved runs of every system; targets are their medians")
    cmp_.add_argument("--pin", nargs="?", const="auto", default=None, metavar="FRONTEND_CPUS:OTHER_CPUS",
                      help="frontends on one CPU set, shards, Redis and ZooKeeper on another (e.g. 0:1; alone: halves of the CPUs)")
    cmp_.add_argument("--network", choices=["off", "dc"], default="off",
                      help="dc: in a network namespace of its own (root), every shard node and Redis behind a link of --link-mbit "
                      "and a proxy adding --delay-ms each way (docs/deploy.md)")  # fmt: skip
    cmp_.add_argument("--link-mbit", type=float, default=1000.0, help="with --network dc: each server's link, each direction (0 = no cap)")
    cmp_.add_argument("--delay-ms", type=float, default=0.25, help="with --network dc: added one way by the delay proxy (0 = no proxy)")
    cmp_.set_defaults(func=_compare)

    sc = bench.add_parser("scaling", help="cost versus candidates, shard nodes or table size (shardrec vs monolith)")
    sc.add_argument("dimension", choices=["candidates", "nodes", "table-size"], help="what varies")
    sc.add_argument("--values", default="", help="comma-separated points (default: candidates 10,100,1000; nodes 1,2,4; table-size demo,large)")
    sc.add_argument("--systems", default="monolith,shardrec", help="comma-separated systems (as bench compare)")
    sc.add_argument("--preset", default="demo", help="model size: small, demo or large")
    sc.add_argument("--spec", default="deploy/placement/mixed.json", help="placement of the shardrec systems")
    sc.add_argument("--nodes", type=int, default=3, help="shard nodes (when nodes is not what varies)")
    sc.add_argument("--workdir", default="var/bench", help="model, logs and state of the benchmark cluster")
    sc.add_argument("--out", default="bench-results/scaling", help="folder for the results and plots")
    sc.add_argument("--candidates", type=int, default=100, help="candidates per request (when they do not vary)")
    sc.add_argument("--low-rate", type=float, default=50.0, help="open-loop rate of the latency run (req/s)")
    sc.add_argument("--cpu-rate", type=float, default=150.0, help="open-loop rate of the CPU and bytes run (req/s)")
    sc.add_argument("--duration-s", type=float, default=6.0, help="recorded length of each run")
    sc.add_argument("--warmup-s", type=float, default=1.0, help="unrecorded load before each run")
    sc.add_argument("--prime-s", type=float, default=3.0, help="unrecorded closed-loop load per system first")
    sc.add_argument("--seed", type=int, default=0, help="seed of the model and the request mix")
    sc.set_defaults(func=_scaling)

    ov = bench.add_parser("overload", help="goodput, sheds and recovery at 1x, 2x, 3x saturation (docs/benchmarks.md)")
    ov.add_argument("--preset", default="demo", help="model size: small, demo or large")
    ov.add_argument("--spec", default="deploy/placement/mixed.json", help="placement of the cluster")
    ov.add_argument("--nodes", type=int, default=3, help="shard nodes")
    ov.add_argument("--workdir", default="var/bench-overload", help="model, logs and state of the benchmark cluster")
    ov.add_argument("--out", default="bench-results/overload", help="folder for overload.json and overload.png")
    ov.add_argument("--runs", type=int, default=3, help="runs; figures are their medians, every run reported")
    ov.add_argument("--burst-s", type=float, default=30.0, help="length of the 3x phase")
    ov.add_argument("--phase-s", type=float, default=5.0, help="length of the 1x and 2x phases")
    ov.add_argument("--calm-s", type=float, default=8.0, help="length of the 0.5x phases before and after")
    ov.add_argument("--stop-s", type=float, default=4.0, help="how long one shard is SIGSTOPped during the burst (0 = none)")
    ov.add_argument("--deadline-ms", type=float, default=1000.0, help="deadline of each request")
    ov.add_argument("--slo-ms", type=float, default=50.0, help="p99 that defines saturation")
    ov.add_argument("--sweep-start", type=float, default=30.0, help="first rate of the saturation sweep (req/s)")
    ov.add_argument("--frontend-args", default="", help="further flags of the frontend under test, e.g. '--admission off'")
    ov.add_argument("--address", default="", help="drive this frontend instead of starting a cluster (needs --saturation-rps)")
    ov.add_argument("--saturation-rps", type=float, default=None, help="skip the sweep: the 1x rate")
    ov.add_argument("--stop-pid", type=int, default=None, help="with --address: the shard to SIGSTOP during the burst")
    ov.add_argument("--seed", type=int, default=0, help="seed of the model and the request mix")
    ov.add_argument("--channels", type=int, default=8, help="connections the load client opens (the kernel spreads them over --workers)")
    ov.add_argument("--workers", type=int, default=1, help="worker processes of the frontend under test (frontend serve --workers)")
    ov.set_defaults(func=_overload)

    run = bench.add_parser("run", help="drive a running frontend")
    run.add_argument("--address", default="", help="frontend host:port (default: the cluster in --workdir)")
    run.add_argument("--workdir", default="var/demo", help="a `shardrec cluster up` workdir: its frontend and pids")
    run.add_argument("--preset", default="demo", help="the model's size, for the request mix")
    run.add_argument("--candidates", type=int, default=100, help="candidates per request")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop at this many requests/s (Poisson)")
    mode.add_argument("--concurrency", type=int, help="closed loop with this many clients")
    mode.add_argument("--sweep", action="store_true", help="raise the rate until p99 passes --slo-ms")
    run.add_argument("--duration-s", type=float, default=10.0, help="recorded length of the run (of each sweep step)")
    run.add_argument("--warmup-s", type=float, default=2.0, help="unrecorded load first")
    run.add_argument("--slo-ms", type=float, default=50.0, help="p99 that ends a sweep")
    run.add_argument("--sweep-start", type=float, default=100.0, help="first rate of a sweep (req/s)")
    run.add_argument("--deadline-ms", type=float, default=1000.0, help="deadline of each request")
    run.add_argument("--label", default="shardrec", help="name of the system in the results")
    run.add_argument("--out", default="bench-results/run", help="folder for run.json and the plots")
    run.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    run.set_defaults(func=_run)


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.compare import CompareConfig, compare
    from benchmarks.network.emulated import NetworkConfig
    from benchmarks.pinning import parse_pin
    from services.localcluster.config import LocalClusterConfig, resolve_spec

    import shlex

    if args.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {args.runs}")
    try:
        pin = parse_pin(args.pin) if args.pin is not None else None
    except ValueError as e:
        raise SystemExit(str(e)) from None

    cfg = CompareConfig(
        cluster=LocalClusterConfig(
            workdir=Path(args.workdir).resolve(), spec=resolve_spec(args.spec), preset=args.preset,
            nodes=args.nodes, seed=args.seed, cluster="bench", frontend_args=tuple(shlex.split(args.frontend_args)),
        ),
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        out_dir=Path(args.out), candidates=args.candidates, low_rate_rps=args.low_rate, cpu_rate_rps=args.cpu_rate,
        duration_s=args.duration_s, warmup_s=args.warmup_s, sweep=not args.no_sweep, sweep_start_rps=args.sweep_start,
        sweep_factor=args.sweep_factor, sweep_max_steps=args.sweep_steps, sweep_duration_s=args.sweep_duration_s,
        slo_p99_ms=args.slo_ms, seed=args.seed, prime_s=args.prime_s, runs=args.runs, pin=pin,
        network=NetworkConfig(args.link_mbit, args.delay_ms) if args.network == "dc" else None,
    )  # fmt: skip
    compare(cfg)
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.compare import CompareConfig
    from benchmarks.scaling import scaling
    from services.localcluster.config import LocalClusterConfig, resolve_spec

    base = CompareConfig(
        cluster=LocalClusterConfig(
            workdir=Path(args.workdir).resolve(), spec=resolve_spec(args.spec), preset=args.preset,
            nodes=args.nodes, seed=args.seed, cluster="bench",
        ),
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        out_dir=Path(args.out), candidates=args.candidates, low_rate_rps=args.low_rate, cpu_rate_rps=args.cpu_rate,
        duration_s=args.duration_s, warmup_s=args.warmup_s, sweep=False, seed=args.seed, prime_s=args.prime_s,
    )  # fmt: skip
    values = [v.strip() for v in args.values.split(",") if v.strip()] or None
    scaling(base, args.dimension, values)
    return 0


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.drive import DriveConfig, cluster_target, drive

    drive(DriveConfig(
        **cluster_target(Path(args.workdir), args.address), preset=args.preset, candidates=args.candidates, rate_rps=args.rate,
        concurrency=args.concurrency, sweep=args.sweep, duration_s=args.duration_s, warmup_s=args.warmup_s,
        slo_ms=args.slo_ms, sweep_start_rps=args.sweep_start, deadline_ms=args.deadline_ms, label=args.label,
        out_dir=Path(args.out), seed=args.seed,
    ))  # fmt: skip
    return 0


def _overload(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from benchmarks.harness.phased import Phase
    from benchmarks.overload import OverloadConfig, overload
    from services.core.errors import ConfigError
    from services.localcluster.config import LocalClusterConfig, resolve_spec

    if args.address and args.saturation_rps is None:
        raise ConfigError("--address needs --saturation-rps (the sweep runs against the cluster this command starts)")
    phases = (Phase("0.5x before", 0.5, args.calm_s), Phase("1x", 1.0, args.phase_s), Phase("2x", 2.0, args.phase_s),
              Phase("3x", 3.0, args.burst_s), Phase("0.5x after", 0.5, args.calm_s))  # fmt: skip
    cluster = None
    if not args.address:
        cluster = LocalClusterConfig(
            workdir=Path(args.workdir).resolve(), spec=resolve_spec(args.spec), preset=args.preset,
            nodes=args.nodes, seed=args.seed, cluster="bench",
        )  # fmt: skip
    overload(OverloadConfig(
        out_dir=Path(args.out), cluster=cluster, address=args.address, saturation_rps=args.saturation_rps,
        stop_pid=args.stop_pid, runs=args.runs, phases=phases, stop_after_s=min(8.0, args.burst_s / 3),
        stop_for_s=args.stop_s, deadline_s=args.deadline_ms / 1000.0, slo_ms=args.slo_ms,
        sweep_start_rps=args.sweep_start, frontend_args=tuple(shlex.split(args.frontend_args)), seed=args.seed,
        channels=args.channels, workers=args.workers, extra={"preset": args.preset},
    ))  # fmt: skip
    return 0
