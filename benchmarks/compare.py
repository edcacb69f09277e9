"""``shardrec bench compare``: the same workload against each system, in turn, on one machine.

Systems share one local cluster (ZooKeeper, Redis with the stored features, the shard
processes) and differ only in their frontend's lookup step:

    shardrec           the cluster's frontend: one Lookup per shard node per micro-batch
    shardrec-nobatch   the same with --max-batch 1 (micro-batching off)
    monolith           --lookup inproc: every table in the frontend's process, no RPC
    redis-kv           --lookup redis-kv: rows in Redis, one MGET per batch, pooled in the frontend
    torchrec           --lookup torchrec: TorchRec EmbeddingBagCollection (optional extra)

Per system: an open loop at a low rate (latency), an open loop at a fixed moderate rate (CPU
per request summed over the system's processes, bytes on the wire), and optionally a sweep
to the saturation point (p99 <= SLO). Requests and arrival schedules are identical for every
system (same seeds). Writes ``<out>/compare.json``, ``latency_cdf.png``, ``sweep.png`` and
prints one table plus the issue's target ratios. With ``network`` (``--network dc``) it all runs
in a network namespace of its own where every shard node and Redis sits behind a capped link
and a delay proxy (``benchmarks/network/``); the proxy's CPU is recorded apart.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from benchmarks.network.emulated import EmulatedNetwork, NetworkConfig, report_lines, server_ports
from services.localcluster.config import LocalClusterConfig
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.state import ROLE_REDIS, ROLE_SHARD

SYSTEMS = ("monolith", "redis-kv", "shardrec", "shardrec-nobatch", "torchrec")


@dataclass(frozen=True)
class CompareConfig:
    cluster: LocalClusterConfig
    systems: tuple[str, ...]
    out_dir: Path
    candidates: int = 100
    low_rate_rps: float = 50.0
    cpu_rate_rps: float = 150.0
    duration_s: float = 8.0
    warmup_s: float = 2.0
    sweep: bool = True
    sweep_start_rps: float = 100.0
    sweep_factor: float = 1.5
    sweep_max_steps: int = 8
    sweep_duration_s: float = 5.0
    slo_p99_ms: float = 50.0
    deadline_s: float = 1.0
    seed: int = 0
    prime_s: float = 5.0
    network: NetworkConfig | None = None  # None: plain loopback


def start_systems(cluster: LocalCluster, systems: tuple[str, ...], extra_args: Sequence[str] = ()) -> dict[str, dict]:
    """Start the frontends of ``systems`` over a started cluster (``extra_args``: further
    flags of each; the cluster's own frontend is used for shardrec when it has one): name ->
    {address, pids}."""
    ck = str(cluster.config.checkpoint)
    common = {name: pid for name, pid in cluster.pids(ROLE_REDIS).items()}
    shards = cluster.pids(ROLE_SHARD)
    out: dict[str, dict] = {}
    for system in systems:
        if system == "shardrec":
            name = "frontend"
            address = cluster.state.frontend or cluster.start_frontend(name, extra_args)
        elif system == "shardrec-nobatch":
            name = "frontend-nobatch"
            address = cluster.start_frontend(name, ["--max-batch", "1", *extra_args])
        elif system == "monolith":
            name = "frontend-monolith"
            address = cluster.start_frontend(name, ["--lookup", "inproc", "--checkpoint", ck, *extra_args])
        elif system == "redis-kv":
            cluster.run_job("load-kv", "loading embedding rows into Redis for redis-kv",
                            ["bench", "load-kv", "--checkpoint", ck, "--redis", cluster.state.redis_url])  # fmt: skip
            name = "frontend-redis-kv"
            address = cluster.start_frontend(name, ["--lookup", "redis-kv", "--checkpoint", ck, *extra_args])
        elif system == "torchrec":
            name = "frontend-torchrec"
            address = cluster.start_frontend(name, ["--lookup", "torchrec", "--checkpoint", ck, *extra_args])
        else:
            raise ValueError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
        pids = {pid: n for n, pid in {**common, name: cluster.pids()[name]}.items()}
        if system.startswith("shardrec"):
            pids.update({pid: n for n, pid in shards.items()})
        out[system] = {"address": address, "pids": pids}
    return out


async def measure_system(cfg: CompareConfig, system: str, address: str, pids: dict[int, str], result, out: IO[str],
                         network: EmulatedNetwork | None = None) -> None:
    from benchmarks.harness import CounterMeter, CpuMeter, OpenLoop, RequestMix, run_recommender, run_record
    from benchmarks.harness.sweep import sweep_async

    mix = RequestMix(cfg.cluster.preset, candidates=cfg.candidates, seed=cfg.seed)

    def progress(p) -> None:
        out.write(f"\r  {system:<17} {p.line()[:110]:<110}")
        out.flush()

    async def at_rate(rate: float, duration_s: float, label: str) -> dict:
        cpu, counters = CpuMeter(pids), CounterMeter(address)
        net = network.meter() if network is not None else None
        stats = await run_recommender(
            address, mix, OpenLoop(rate, duration_s, cfg.warmup_s, seed=cfg.seed),
            deadline_s=cfg.deadline_s, progress=progress, meters=[cpu, counters, *([net] if net else [])],
        )  # fmt: skip
        out.write("\n")
        record = run_record(stats, label=label, cpu=cpu, counters_delta=counters.delta)
        if net is not None:  # the network's own cost, apart from the system's CPU
            record["network"] = net.to_dict(record["requests_in_window"])
        return record

    description = {"address": address, "processes": sorted(set(pids.values()))}
    result.system(system, description={**description, **({"network": network.describe()} if network else {})})
    if cfg.prime_s > 0:  # touch the memory-mapped tables and warm caches; not recorded
        from benchmarks.harness import ClosedLoop

        await run_recommender(address, mix, ClosedLoop(8, cfg.prime_s), deadline_s=cfg.deadline_s, progress=progress)
        out.write("\n")
    result.add_run(system, await at_rate(cfg.low_rate_rps, cfg.duration_s, "low-load"))
    result.add_run(system, await at_rate(cfg.cpu_rate_rps, cfg.duration_s, "cpu"))
    if cfg.sweep:
        sweep = await sweep_async(
            lambda rate: at_rate(rate, cfg.sweep_duration_s, f"sweep {rate:.0f}/s"),
            cfg.sweep_start_rps, slo_p99_ms=cfg.slo_p99_ms, factor=cfg.sweep_factor, max_steps=cfg.sweep_max_steps,
        )  # fmt: skip
        result.add_sweep(system, sweep)


def _run(doc: dict, system: str, label: str) -> dict | None:
    for s in doc["systems"]:
        if s["name"] == system:
            return next((r for r in s["runs"] if r.get("label") == label), None)
    return None


def _saturation(doc: dict, system: str) -> float | None:
    for s in doc["systems"]:
        if s["name"] == system and s.get("sweep"):
            return s["sweep"].get("saturation_rps")
    return None


def targets(doc: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) for the issue's targets that this run can speak to."""
    rows: list[tuple[str, str, str, bool | None]] = []
    sr, mono, kv = _run(doc, "shardrec", "low-load"), _run(doc, "monolith", "low-load"), _run(doc, "redis-kv", "cpu")
    if sr and mono:
        for q, goal in (("p50_ms", 1.5), ("p99_ms", 3.0)):
            gap = sr["latency_ms"][q] - mono["latency_ms"][q]
            rows.append((f"latency gap to monolith at low load, {q[:-3]}", f"{gap:+.2f} ms", f"<= +{goal} ms", gap <= goal))
    src, monoc = _run(doc, "shardrec", "cpu"), _run(doc, "monolith", "cpu")
    if src and monoc and src["cpu_seconds_per_request"] and monoc["cpu_seconds_per_request"]:
        r = src["cpu_seconds_per_request"] / monoc["cpu_seconds_per_request"]
        rows.append(("CPU per Recommend vs monolith (all processes)", f"{r:.2f}x", "<= 1.25x", r <= 1.25))
    s_sr, s_kv, s_nb = _saturation(doc, "shardrec"), _saturation(doc, "redis-kv"), _saturation(doc, "shardrec-nobatch")
    if s_sr and s_kv:
        rows.append(("saturation throughput vs redis-kv", f"{s_sr / s_kv:.2f}x ({s_sr:.0f} vs {s_kv:.0f}/s)", ">= 1.5x", s_sr / s_kv >= 1.5))
    if s_sr and s_nb:
        rows.append(("micro-batching on vs off, saturation", f"{s_sr / s_nb:.2f}x ({s_sr:.0f} vs {s_nb:.0f}/s)", ">= 2x", s_sr / s_nb >= 2))
    if src and kv and src["wire_bytes_per_request"] and kv["wire_bytes_per_request"]:
        a, b = src["wire_bytes_per_request"], kv["wire_bytes_per_request"]
        if b.get("user"):
            rows.append(("user-side bytes per Recommend vs redis-kv", f"{a['user'] / b['user']:.3f} ({a['user']:.0f} vs {b['user']:.0f} B)", "<= 0.1", a["user"] / b["user"] <= 0.1))
        rows.append(("total bytes per Recommend vs redis-kv", f"{a['total'] / b['total']:.3f} ({a['total']:.0f} vs {b['total']:.0f} B)", "<= 0.5", a["total"] / b["total"] <= 0.5))
    return rows


def compare(cfg: CompareConfig, out: IO[str] = sys.stdout) -> dict:
    from benchmarks.harness import BenchResult, format_table, run
    from benchmarks.harness.workload import RequestMix

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result = BenchResult(
        workload=RequestMix(cfg.cluster.preset, candidates=cfg.candidates, seed=cfg.seed).params(),
        notes=f"shardrec bench compare: placement {cfg.cluster.spec.name}, {cfg.cluster.nodes} shard nodes, "
        f"preset {cfg.cluster.preset}; every process on this machine",
    )
    network = None
    if cfg.network is not None:
        from benchmarks.network.emulated import enter_private_network

        enter_private_network()  # first: before any thread starts
        network = EmulatedNetwork(cfg.network, cfg.cluster.logs_dir)
    with SignalGuard() as guard:
        cluster_cfg = cfg.cluster if network is None else replace(cfg.cluster, shards_only=True, shard_args=network.shard_args())
        cluster = LocalCluster(cluster_cfg, out, guard, mode="bench")
        try:
            cluster.start()
            extra: list[str] = []
            if network is not None:
                network.start(*server_ports(cluster))
                out.write(f"emulated network: {network.describe()}\n")
                cluster.load_features()
                extra = network.frontend_args()
            systems = start_systems(cluster, cfg.systems, extra)
            if network is not None:
                network.shape()
            for system in cfg.systems:
                out.write(f"measuring {system} at {systems[system]['address']}\n")
                run(measure_system(cfg, system, systems[system]["address"], systems[system]["pids"], result, out, network))
        finally:
            cluster.stop()
            if network is not None:
                network.stop()
    doc = result.to_dict()
    doc["targets"] = [{"target": t, "measured": m, "goal": g, "met": ok} for t, m, g, ok in targets(doc)]
    from benchmarks.harness import plots, write_json

    write_json(doc, cfg.out_dir / "compare.json")
    plots.latency_cdf(doc, cfg.out_dir / "latency_cdf.png")
    if cfg.sweep:
        plots.sweep_plot(doc, cfg.out_dir / "sweep.png", slo_p99_ms=cfg.slo_p99_ms)
    out.write("\n" + format_table(doc) + "\n\n")
    if network is not None:
        out.write("\n".join(report_lines(doc)) + "\n\n")
    for t in doc["targets"]:
        mark = "ok  " if t["met"] else "MISS"
        out.write(f"  {mark} {t['target']:<48} {t['measured']:<32} (target {t['goal']})\n")
    out.write(f"\nwrote {cfg.out_dir / 'compare.json'} and plots in {cfg.out_dir}\n")
    return doc
