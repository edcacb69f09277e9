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
system (same seeds), and every phase (prime, low-load, cpu, each sweep step, of each run) sends
its own range of the seeded mix, so no phase is measured on requests a cache has just seen.
``runs`` > 1 measures every system that many times, interleaved; each run is reported and the
targets are the medians of the runs' ratios. ``pin`` puts the frontends on one CPU set and the
shards, Redis and ZooKeeper on another (``pinning.py``); frontend-host CPU per Recommend is
reported beside the total either way. Writes ``<out>/compare.json`` (the first run's systems,
``compare_runs`` with every run), ``latency_cdf.png``, ``sweep.png`` and prints the tables
plus the issue's target ratios (docs/benchmarks.md). With ``network`` (``--network dc``) it all runs
in a network namespace of its own where every shard node and Redis sits behind a capped link
and a delay proxy (``benchmarks/network/``); the proxy's CPU is recorded apart.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from benchmarks.network.emulated import EmulatedNetwork, NetworkConfig, report_lines, server_ports
from services.localcluster.config import LocalClusterConfig
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.state import ROLE_REDIS, ROLE_SHARD, ROLE_ZOOKEEPER

SYSTEMS = ("monolith", "redis-kv", "shardrec", "shardrec-nobatch", "torchrec")
# Each phase's requests start at (run * PHASES_PER_RUN + phase) * PHASE_REQUESTS of the mix.
PHASE_REQUESTS = 1 << 20
PHASES_PER_RUN = 1 << 8


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
    sweep_factor: float = 1.15
    sweep_max_steps: int = 16
    sweep_duration_s: float = 5.0
    slo_p99_ms: float = 50.0
    deadline_s: float = 1.0
    seed: int = 0
    prime_s: float = 5.0
    runs: int = 1  # interleaved runs of every system; targets are their medians
    pin: tuple[frozenset[int], frozenset[int]] | None = None  # (frontend CPUs, other CPUs)
    network: NetworkConfig | None = None  # None: plain loopback

    @property
    def pin_text(self) -> str:
        from benchmarks.pinning import cpu_list

        return f"{cpu_list(self.pin[0])}:{cpu_list(self.pin[1])}" if self.pin else ""


def start_systems(cluster: LocalCluster, systems: tuple[str, ...], extra_args: Sequence[str] = ()) -> dict[str, dict]:
    """Start the frontends of ``systems`` over a started cluster (``extra_args``: further
    flags of each; the cluster's own frontend is used for shardrec when it has one): name ->
    {address, pids, frontend (its process's name)}."""
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
        out[system] = {"address": address, "pids": pids, "frontend": name}
    return out


def pin_cluster(cluster: LocalCluster, systems: dict[str, dict], pin: tuple[frozenset[int], frozenset[int]]) -> dict:
    """Frontends (the monolith's too) on ``pin[0]``; shards, Redis and ZooKeeper on ``pin[1]``."""
    from benchmarks.pinning import cpu_list, pin_processes

    names = cluster.pids()
    front = {names[s["frontend"]]: s["frontend"] for s in systems.values()}
    rest = {pid: n for n, pid in cluster.pids(ROLE_SHARD, ROLE_REDIS, ROLE_ZOOKEEPER).items()}
    return {
        "frontend_cpus": cpu_list(pin[0]), "frontend": pin_processes(front, pin[0]),
        "other_cpus": cpu_list(pin[1]), "other": pin_processes(rest, pin[1]),
    }  # fmt: skip


async def measure_system(
    cfg: CompareConfig, system: str, address: str, pids: dict[int, str], result, out: IO[str], *, run_index: int = 0, frontend: str = "",
    network: EmulatedNetwork | None = None,
) -> None:
    from benchmarks.harness import CounterMeter, CpuMeter, OpenLoop, RequestMix, run_recommender, run_record
    from benchmarks.harness.sweep import sweep_async

    mix = RequestMix(cfg.cluster.preset, candidates=cfg.candidates, seed=cfg.seed)
    phases = itertools.count(run_index * PHASES_PER_RUN)

    def requests():
        """The next phase's own range of the mix (the same for every system)."""
        start = next(phases) * PHASE_REQUESTS
        return lambda i: mix.request(start + i)

    def progress(p) -> None:
        out.write(f"\r  {system:<17} {p.line()[:110]:<110}")
        out.flush()

    async def at_rate(rate: float, duration_s: float, label: str) -> dict:
        cpu, counters = CpuMeter(pids), CounterMeter(address)
        net = network.meter() if network is not None else None
        stats = await run_recommender(
            address, requests(), OpenLoop(rate, duration_s, cfg.warmup_s, seed=cfg.seed),
            deadline_s=cfg.deadline_s, progress=progress, meters=[cpu, counters, *([net] if net else [])],
        )  # fmt: skip
        out.write("\n")
        record = run_record(stats, label=label, cpu=cpu, counters_delta=counters.delta)
        n, host = record["requests_in_window"], cpu.by_process.get(frontend)
        record["frontend_cpu_seconds_per_request"] = round(host / n, 9) if n and host is not None else None
        if net is not None:  # the network's own cost, apart from the system's CPU
            record["network"] = net.to_dict(n)
        return record

    description = {"address": address, "processes": sorted(set(pids.values())), "frontend": frontend}
    result.system(system, description={**description, **({"network": network.describe()} if network else {})})
    if cfg.prime_s > 0:  # touch the memory-mapped tables and warm caches; not recorded
        from benchmarks.harness import ClosedLoop

        await run_recommender(address, requests(), ClosedLoop(8, cfg.prime_s), deadline_s=cfg.deadline_s, progress=progress)
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


_UNITS = {"ms": "{:+.2f} ms", "x": "{:.2f}x", "": "{:.3f}"}


def _row(target: str, value: float, measured: str, goal: str, limit: float, at_most: bool = True, unit: str = "x") -> dict:
    met = value <= limit if at_most else value >= limit
    return {"target": target, "value": value, "unit": unit, "measured": measured, "goal": goal, "met": met, "limit": limit,
            "at_most": at_most}  # fmt: skip


def target_rows(doc: dict) -> list[dict]:
    """The issue's targets that this run can speak to: target, value, measured, goal, met."""
    rows: list[dict] = []
    sr, mono, kv = _run(doc, "shardrec", "low-load"), _run(doc, "monolith", "low-load"), _run(doc, "redis-kv", "cpu")
    if sr and mono:
        for q, goal in (("p50_ms", 2.0), ("p99_ms", 3.0)):
            gap = sr["latency_ms"][q] - mono["latency_ms"][q]
            rows.append(_row(f"latency gap to monolith at low load, {q[:-3]}", gap, f"{gap:+.2f} ms", f"<= +{goal} ms", goal, unit="ms"))
    src, monoc = _run(doc, "shardrec", "cpu"), _run(doc, "monolith", "cpu")
    if src and monoc and src["cpu_seconds_per_request"] and monoc["cpu_seconds_per_request"]:
        r = src["cpu_seconds_per_request"] / monoc["cpu_seconds_per_request"]
        rows.append(_row("CPU per Recommend vs monolith (all processes)", r, f"{r:.2f}x", "<= 1.3x", 1.3))
    if src and monoc and src.get("frontend_cpu_seconds_per_request") and monoc.get("frontend_cpu_seconds_per_request"):
        a, b = src["frontend_cpu_seconds_per_request"], monoc["frontend_cpu_seconds_per_request"]
        rows.append(_row("frontend-host CPU per Recommend vs monolith", a / b, f"{a / b:.2f}x ({a * 1e3:.2f} vs {b * 1e3:.2f} ms)",
                         "<= 1.15x (pinned)", 1.15))  # fmt: skip
    s_sr, s_kv, s_nb, s_mono = (_saturation(doc, s) for s in ("shardrec", "redis-kv", "shardrec-nobatch", "monolith"))
    for other, base, goal in ((s_mono, "monolith", 0.7), (s_kv, "redis-kv", 1.5)):
        if s_sr and other:
            rows.append(_row(f"saturation throughput vs {base}", s_sr / other, f"{s_sr / other:.2f}x ({s_sr:.0f} vs {other:.0f}/s)",
                             f">= {goal}x", goal, at_most=False))  # fmt: skip
    if s_sr and s_nb:
        rows.append(_row("micro-batching on vs off, saturation", s_sr / s_nb, f"{s_sr / s_nb:.2f}x ({s_sr:.0f} vs {s_nb:.0f}/s)", ">= 2x", 2, at_most=False))
    if src and kv and src["wire_bytes_per_request"] and kv["wire_bytes_per_request"]:
        a, b = src["wire_bytes_per_request"], kv["wire_bytes_per_request"]
        if b.get("user"):
            r = a["user"] / b["user"]
            rows.append(_row("user-side bytes per Recommend vs redis-kv", r, f"{r:.3f} ({a['user']:.0f} vs {b['user']:.0f} B)", "<= 0.1", 0.1, unit=""))
        r = a["total"] / b["total"]
        rows.append(_row("total bytes per Recommend vs redis-kv", r, f"{r:.3f} ({a['total']:.0f} vs {b['total']:.0f} B)", "<= 0.5", 0.5, unit=""))
    return rows


def targets(doc: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) for the issue's targets that this run can speak to."""
    return [(r["target"], r["measured"], r["goal"], r["met"]) for r in target_rows(doc)]


def median_targets(per_run: list[list[dict]]) -> list[dict]:
    """Each target's median value over the runs that measured it, with every run's value."""
    names = list(dict.fromkeys(r["target"] for rows in per_run for r in rows))
    out = []
    for name in names:
        rows = [r for rows in per_run for r in rows if r["target"] == name]
        values = [r["value"] for r in rows]
        first, value = rows[0], statistics.median(values)
        shown = _UNITS[first["unit"]].format(value)
        row = _row(name, value, f"median {shown} of {len(values)}", first["goal"], first["limit"], first["at_most"], first["unit"])
        out.append({**row, "per_run": [round(v, 4) for v in values]})
    return out


def _print_targets(rows: list[dict], out: IO[str]) -> None:
    for t in rows:
        mark = "ok  " if t["met"] else "MISS"
        runs = f" runs {t['per_run']}" if "per_run" in t else ""
        out.write(f"  {mark} {t['target']:<48} {t['measured']:<32} (target {t['goal']}){runs}\n")


def compare(cfg: CompareConfig, out: IO[str] = sys.stdout) -> dict:
    from benchmarks.harness import BenchResult, format_table, run
    from benchmarks.harness.workload import RequestMix

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    where = "every process on this machine" + (f", pinned (--pin {cfg.pin_text})" if cfg.pin else "")
    results = [
        BenchResult(
            workload=RequestMix(cfg.cluster.preset, candidates=cfg.candidates, seed=cfg.seed).params(),
            notes=f"shardrec bench compare: placement {cfg.cluster.spec.name}, {cfg.cluster.nodes} shard nodes, "
            f"preset {cfg.cluster.preset}; {where}; run {r + 1} of {cfg.runs}",
        )
        for r in range(cfg.runs)
    ]
    pinned = None
    network = None
    if cfg.network is not None:
        from benchmarks.network.emulated import enter_private_network

        enter_private_network()  # first: before any thread starts
        network = EmulatedNetwork(cfg.network, cfg.cluster.logs_dir)
    with SignalGuard() as guard:
        cluster_cfg = cfg.cluster if network is None else replace(cfg.cluster, shards_only=True, shard_args=(*cfg.cluster.shard_args, *network.shard_args()))
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
            if cfg.pin:
                pinned = pin_cluster(cluster, systems, cfg.pin)
                out.write(f"pinned: {pinned}\n")
            for r, result in enumerate(results):  # interleaved: every system once per run
                for system in cfg.systems:
                    s = systems[system]
                    out.write(f"run {r + 1}/{cfg.runs}: measuring {system} at {s['address']}\n")
                    run(measure_system(cfg, system, s["address"], s["pids"], result, out, run_index=r, frontend=s["frontend"], network=network))
        finally:
            cluster.stop()
            if network is not None:
                network.stop()
    docs = [result.to_dict() for result in results]
    per_run = [target_rows(d) for d in docs]
    doc = docs[0]
    doc["pinned"] = pinned
    doc["compare_runs"] = [{"run": r + 1, "systems": d["systems"], "targets": rows} for r, (d, rows) in enumerate(zip(docs, per_run))]
    doc["targets"] = median_targets(per_run) if cfg.runs > 1 else per_run[0]
    from benchmarks.harness import plots, write_json

    write_json(doc, cfg.out_dir / "compare.json")
    plots.latency_cdf(doc, cfg.out_dir / "latency_cdf.png")
    if cfg.sweep:
        plots.sweep_plot(doc, cfg.out_dir / "sweep.png", slo_p99_ms=cfg.slo_p99_ms)
    for r, (d, rows) in enumerate(zip(docs, per_run)):
        out.write(f"\n=== run {r + 1} of {cfg.runs} ===\n" + format_table(d) + "\n\n")
        if network is not None:
            out.write("\n".join(report_lines(d)) + "\n\n")
        _print_frontend_cpu(d, out)
        _print_targets(rows, out)
    if cfg.runs > 1:
        out.write(f"\n=== medians of {cfg.runs} interleaved runs ===\n")
        _print_targets(doc["targets"], out)
    out.write(f"\nwrote {cfg.out_dir / 'compare.json'} and plots in {cfg.out_dir}\n")
    return doc


def _print_frontend_cpu(doc: dict, out: IO[str]) -> None:
    """CPU ms per Recommend at the cpu rate: the frontend host's apart from all processes'."""
    for s in doc["systems"]:
        cpu = next((r for r in s["runs"] if r.get("label") == "cpu"), None)
        if cpu and cpu["cpu_seconds_per_request"] and cpu.get("frontend_cpu_seconds_per_request"):
            out.write(f"  {s['name']:<18} CPU per Recommend: frontend host {cpu['frontend_cpu_seconds_per_request'] * 1e3:.2f} ms, "
                      f"all processes {cpu['cpu_seconds_per_request'] * 1e3:.2f} ms\n")  # fmt: skip
