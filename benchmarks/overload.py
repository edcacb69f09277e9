"""``shardrec bench overload``: goodput, sheds and recovery at 1x, 2x and 3x saturation.

One run (docs/benchmarks.md, "Overload"):

1. saturation: a sweep (p99 <= SLO) against a frontend with admission control OFF, the same
   build, measured in this run;
2. one open-loop schedule against the frontend under test, without gaps: 0.5x (baseline),
   1x, 2x, 3x (long), then 0.5x again; during the 3x phase one shard is SIGSTOPped for a few
   seconds (it must be ejected while no healthy shard is);
3. per phase: goodput (OK within the deadline per second), sheds (RESOURCE_EXHAUSTED) and
   their latency as the client sees it, admitted p99, other errors; the frontend's counters per
   phase (sheds, ejections per node, requests dropped dead before a stage, answers computed
   too late) and the server-side time to refuse; recovery time after the burst.

``--runs N`` repeats 2-3 on one cluster and reports the median of each figure with every run.
``--address`` drives a frontend started elsewhere (e.g. another build) with the same schedule:
saturation then comes from ``--saturation-rps``, and the SIGSTOP from ``--stop-pid``.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from benchmarks.harness.phased import Phase, Records, drive_phases, phase_summary, recovery_s, window_p99_ms
from services.localcluster.config import LocalClusterConfig

PHASES = (Phase("0.5x before", 0.5, 8.0), Phase("1x", 1.0, 5.0), Phase("2x", 2.0, 5.0), Phase("3x", 3.0, 30.0), Phase("0.5x after", 0.5, 8.0))
BURST = 3  # index of the 3x phase


@dataclass(frozen=True)
class OverloadConfig:
    out_dir: Path
    cluster: LocalClusterConfig | None = None  # None: drive ``address``
    address: str = ""
    saturation_rps: float | None = None  # None: measure it (needs ``cluster``)
    stop_pid: int | None = None  # with ``address``: the shard to SIGSTOP during the burst
    runs: int = 3
    phases: tuple[Phase, ...] = PHASES
    stop_after_s: float = 8.0  # into the burst
    stop_for_s: float = 4.0
    deadline_s: float = 1.0
    slo_ms: float = 50.0
    candidates: int = 100
    sweep_start_rps: float = 30.0
    sweep_factor: float = 1.15
    sweep_duration_s: float = 4.0
    frontend_args: tuple[str, ...] = ()  # further flags of the frontend under test
    seed: int = 0
    channels: int = 8  # connections of the load client (frontend workers share the load per connection)
    workers: int = 1  # ``frontend serve --workers`` of the frontend under test (its counters are summed)
    extra: dict = field(default_factory=dict)


def _start(cfg: OverloadConfig, out: IO[str]):
    """(cluster, guard, address under test, address of the admission-off frontend, shard pids)."""
    from services.localcluster.launcher import LocalCluster
    from services.localcluster.processes import SignalGuard
    from services.localcluster.state import ROLE_SHARD

    guard = SignalGuard()
    guard.__enter__()
    cluster = LocalCluster(cfg.cluster, out, guard, mode="bench")
    try:
        cluster.start()
        args = [*cfg.frontend_args, *(["--workers", str(cfg.workers)] if cfg.workers > 1 else [])]
        under_test = cluster.start_frontend("frontend-overload", args) if args else cluster.state.frontend
        off = cluster.start_frontend("frontend-noadmission", ["--admission", "off"])
    except BaseException:
        cluster.stop()
        guard.__exit__(None, None, None)
        raise
    return cluster, guard, under_test, off, cluster.pids(ROLE_SHARD)


async def _counters(address: str, workers: int = 1) -> dict[str, int]:
    """The frontend's counters; with ``workers`` > 1 (``frontend serve --workers``), every
    worker's, summed (maxima for the p99 and largest batch): connections are opened until each
    worker, told apart by its instance id, has answered once."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from benchmarks.harness.cpu import read_counters
    from services.core.clients import make_channel
    from services.core.rpc.server import INSTANCE_ID_KEY

    per_worker: dict[str, dict[str, int]] = {}
    for _attempt in range(20 * workers):
        ch = make_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            call = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            await call
            iid = dict(await call.trailing_metadata() or ()).get(INSTANCE_ID_KEY, "")
            if iid not in per_worker:
                per_worker[iid] = await read_counters(ch)
        except grpc.RpcError as e:
            raise RuntimeError(f"counters of {address}: {e.code().name} {e.details()}") from None
        finally:
            await ch.close()
        if len(per_worker) >= workers:
            break
    else:
        raise RuntimeError(f"counters of {address}: reached {len(per_worker)} of {workers} workers")
    out: dict[str, int] = {}
    for counters in per_worker.values():
        for k, v in counters.items():
            out[k] = max(out.get(k, v), v) if k in _MAXIMA else out.get(k, 0) + v
    return out


_MAXIMA = ("shed_p99_us", "largest_batch")


async def _saturation(cfg: OverloadConfig, address: str, mix, label: str, out: IO[str]) -> float:
    from benchmarks.harness import ClosedLoop, OpenLoop, run_recommender
    from benchmarks.harness.sweep import sweep_async

    # touch the memory-mapped tables and warm the caches first (not recorded)
    await run_recommender(address, mix, ClosedLoop(4, 5.0), deadline_s=cfg.deadline_s)

    async def at_rate(rate: float) -> object:
        stats = await run_recommender(address, mix, OpenLoop(rate, cfg.sweep_duration_s, 1.0, seed=cfg.seed), deadline_s=cfg.deadline_s)
        out.write(f"  {label} sweep {rate:6.0f}/s: {stats.throughput_rps:6.1f}/s p99 {stats.p99_ms:7.1f} ms errors {stats.error_count}\n")
        return stats

    result = await sweep_async(at_rate, cfg.sweep_start_rps, slo_p99_ms=cfg.slo_ms, factor=cfg.sweep_factor, max_steps=30)
    if result.saturation_rps is None:
        raise RuntimeError(f"the sweep found no rate under the {cfg.slo_ms} ms SLO (start lower than {cfg.sweep_start_rps}/s)")
    return float(result.saturation_rps)


async def one_run(cfg: OverloadConfig, address: str, saturation: float, stop_pid: int | None, mix, out: IO[str]) -> dict:
    """The phased schedule at ``saturation`` against ``address``; the figures of one run."""
    from benchmarks.harness import RecommenderClient

    starts = [sum(p.duration_s for p in cfg.phases[:i]) for i in range(len(cfg.phases) + 1)]
    snapshots: dict[int, dict[str, int]] = {}

    def snap(i: int):
        async def read() -> None:
            snapshots[i] = await _counters(address, cfg.workers)

        return read

    events = [(starts[i], snap(i)) for i in range(len(cfg.phases))]
    stopped: dict[str, float] = {}
    if stop_pid is not None:
        t_stop = starts[BURST] + cfg.stop_after_s
        events += [(t_stop, lambda: os.kill(stop_pid, signal.SIGSTOP)), (t_stop + cfg.stop_for_s, lambda: os.kill(stop_pid, signal.SIGCONT))]
        stopped = {"pid": stop_pid, "at_s": t_stop, "for_s": cfg.stop_for_s}
    async with RecommenderClient(address, deadline_s=cfg.deadline_s, channels=cfg.channels) as client:
        try:
            rec = await drive_phases(client, mix, cfg.phases, saturation, deadline_s=cfg.deadline_s, seed=cfg.seed, at=events)
        finally:
            if stop_pid is not None:
                os.kill(stop_pid, signal.SIGCONT)
    snapshots[len(cfg.phases)] = await _counters(address, cfg.workers)
    return summarize(rec, saturation, snapshots, stopped)


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}


# Requests dropped dead before any work (free), and work spent on requests that died after it.
_DROPPED = ("dropped_gone", "dropped_queued")
_WASTE = ("dropped_after_features", "dropped_after_lookup", "answered_too_late")


def summarize(rec: Records, saturation: float, snapshots: dict[int, dict[str, int]], stopped: dict) -> dict:
    phases = phase_summary(rec)
    for i, ph in enumerate(phases):
        d = _delta(snapshots[i], snapshots[i + 1])
        ph["frontend"] = {
            "shed": {k[5:]: v for k, v in d.items() if k.startswith("shed_") and k != "shed_p99_us"},
            "ejections": {k[len("node_ejections_"):]: v for k, v in d.items() if k.startswith("node_ejections_")},
            "dropped_before_work": {k: d.get(k, 0) for k in _DROPPED},
            "wasted": {k: d.get(k, 0) for k in _WASTE},
            "redis_round_trips": d.get("redis_round_trips", 0),
            "lookup_rpcs": d.get("lookup_rpcs", 0),
            "failovers": d.get("lookup_failovers", 0),
            "shed_p99_us_server": snapshots[i + 1].get("shed_p99_us"),
            "admission_limit_at_end": snapshots[i + 1].get("admission_limit"),
        }
    burst = phases[BURST]
    return {
        "saturation_rps": saturation,
        "stopped": stopped,
        "phases": phases,
        "goodput_3x_over_saturation": burst["goodput_share_of_base"],
        "shed_p99_ms_client_3x": burst["shed_latency_ms"]["p99"],
        "shed_p99_us_server_3x": burst["frontend"]["shed_p99_us_server"],
        "admitted_p99_ms_3x": burst["admitted_latency_ms"]["p99"],
        "ejections_3x": burst["frontend"]["ejections"],
        "recovery_s": recovery_s(rec, 0, len(rec.phases) - 1),
        "after_windows_p99_ms": window_p99_ms(rec, len(rec.phases) - 1),
        "samples": rec.samples,
    }


def _median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def overload(cfg: OverloadConfig, out: IO[str] = sys.stdout) -> dict:
    import json

    from benchmarks.harness import RequestMix, run

    preset = cfg.cluster.preset if cfg.cluster is not None else cfg.extra.get("preset", "demo")
    mix = RequestMix(preset, candidates=cfg.candidates, seed=cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    cluster = guard = None
    try:
        if cfg.cluster is not None:
            cluster, guard, address, off, shards = _start(cfg, out)
            stop_pid = shards.get("shard-0")
        else:
            address, off, stop_pid = cfg.address, None, cfg.stop_pid
        if cfg.stop_for_s <= 0:
            stop_pid = None
        for r in range(cfg.runs):
            if cfg.saturation_rps is not None:
                sat = cfg.saturation_rps
            else:
                sat = run(_saturation(cfg, off, mix, f"run {r + 1}: admission off", out))
            out.write(f"run {r + 1}/{cfg.runs}: saturation {sat:.0f}/s; phases {[p.name for p in cfg.phases]}\n")
            doc = run(one_run(cfg, address, sat, stop_pid, mix, out))
            runs.append(doc)
            out.write(format_run(doc) + "\n")
    finally:
        if cluster is not None:
            cluster.stop()
            guard.__exit__(None, None, None)
    keys = ("saturation_rps", "goodput_3x_over_saturation", "shed_p99_ms_client_3x", "shed_p99_us_server_3x", "admitted_p99_ms_3x", "recovery_s")
    result = {
        "config": {"phases": [p.__dict__ for p in cfg.phases], "deadline_s": cfg.deadline_s, "slo_ms": cfg.slo_ms,
                   "frontend_args": list(cfg.frontend_args), "address": cfg.address or None, **cfg.extra},
        "median": {k: _median([d[k] for d in runs]) for k in keys},
        "runs": runs,
    }  # fmt: skip
    (cfg.out_dir / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs, cfg.out_dir / "overload.png")
    out.write("median of %d runs: %s\n" % (len(runs), ", ".join(f"{k} {v}" for k, v in result["median"].items())))
    return result


def format_run(doc: dict) -> str:
    lines = [f"  {'phase':<12} {'offered':>8} {'goodput':>8} {'shed':>6} {'shed p99':>9} {'ok p99':>8}  errors / ejections / wasted"]
    for ph in doc["phases"]:
        f = ph["frontend"]
        lines.append(
            f"  {ph['phase']:<12} {ph['offered_rps']:>7.0f}/s {ph['goodput_rps']:>7.0f}/s {ph['shed']:>6} "
            f"{_ms(ph['shed_latency_ms']['p99']):>9} {_ms(ph['admitted_latency_ms']['p99']):>8}  "
            f"{ph['errors']} / {f['ejections']} / {sum(f['wasted'].values())}"
        )
    lines.append(
        f"  goodput at 3x = {doc['goodput_3x_over_saturation']:.2f} x saturation; shed p99 {_ms(doc['shed_p99_ms_client_3x'])} "
        f"(server {doc['shed_p99_us_server_3x']} us); admitted p99 {_ms(doc['admitted_p99_ms_3x'])}; recovery {doc['recovery_s']} s"
    )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _plot(runs: list[dict], path: Path) -> None:
    """Goodput and admitted p99 per phase, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, doc in enumerate(runs):
        names = [p["phase"] for p in doc["phases"]]
        a.plot(names, [p["goodput_rps"] for p in doc["phases"]], marker="o", label=f"run {i + 1} goodput")
        a.plot(names, [p["offered_rps"] for p in doc["phases"]], ls=":", color="grey")
        b.plot(names, [p["admitted_latency_ms"]["p99"] or 0 for p in doc["phases"]], marker="o", label=f"run {i + 1}")
    a.set_ylabel("requests/s (dotted: offered)")
    a.set_title("goodput (OK within deadline)")
    b.set_ylabel("ms")
    b.set_title("admitted p99")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
