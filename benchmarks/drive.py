"""``shardrec bench run``: drive a running frontend (e.g. one from ``shardrec cluster up``) at a
fixed rate, with N closed-loop clients, or as a sweep to the saturation point; write
``<out>/run.json`` and the plots, print the table (docs/benchmarks.md)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping

from services.core.errors import ConfigError
from services.localcluster.state import ROLE_FRONTEND, ROLE_REDIS, ROLE_SHARD, read_state


@dataclass(frozen=True)
class DriveConfig:
    """One ``bench run``: the frontend and the processes whose CPU counts, and the load."""

    address: str
    pids: Mapping[int, str] = field(default_factory=dict)  # pid -> process name
    preset: str = "demo"
    candidates: int = 100
    rate_rps: float | None = None  # open loop (Poisson); the default when no mode is given: 100/s
    concurrency: int | None = None  # closed loop with this many clients
    sweep: bool = False  # raise the rate until p99 passes slo_ms
    duration_s: float = 10.0
    warmup_s: float = 2.0
    slo_ms: float = 50.0
    sweep_start_rps: float = 100.0
    deadline_ms: float = 1000.0
    label: str = "shardrec"
    out_dir: Path = Path("bench-results/run")
    seed: int = 0
    # Authentication on (docs/security.md): a caller token for Recommend, an admin token for
    # GetStats (the counters), the CA of a TLS frontend.
    token: str | None = None
    admin_token: str | None = None
    tls_ca: str = ""


def cluster_target(workdir: Path, address: str = "") -> dict:
    """What to drive: ``address`` (else the frontend of the local cluster in ``workdir``), the
    pids of that cluster's shards, frontend and Redis, and, for a cluster started with --tls or
    --auth, its CA and caller and admin tokens: DriveConfig's fields. ConfigError when there is
    no address."""
    from services.localcluster.security import read_token

    target: dict = {"address": address, "pids": {}}
    state = read_state(workdir)
    if state is not None:
        target["address"] = address or state.frontend
        target["pids"] = {p.pid: p.name for p in state.processes if p.role in (ROLE_SHARD, ROLE_FRONTEND, ROLE_REDIS)}
        target["tls_ca"] = state.tls_ca
        target["token"] = read_token(state.token_file) if state.token_file else None
        target["admin_token"] = read_token(state.admin_token_file) if state.admin_token_file else None
    if not target["address"]:
        raise ConfigError(f"no --address and no running cluster in {workdir} (start one with `shardrec cluster up`)")
    return target


def drive(cfg: DriveConfig, out: IO[str] | None = None) -> dict:
    """Run the load of ``cfg`` against ``cfg.address``; write run.json and the plots under
    ``cfg.out_dir``, print the table to ``out`` (default stdout). Returns the result document."""
    out = out or sys.stdout
    from benchmarks.harness import (
        BenchResult, ClosedLoop, CounterMeter, CpuMeter, OpenLoop, RequestMix, format_table, plots, run,
        run_recommender, run_record,
    )  # fmt: skip
    from benchmarks.harness.sweep import sweep_async

    mix = RequestMix(cfg.preset, candidates=cfg.candidates, seed=cfg.seed)

    def progress(p) -> None:
        out.write(f"\r  {p.line()[:120]:<120}")
        out.flush()

    async def once(load, label):
        cpu, counters = CpuMeter(dict(cfg.pids)), CounterMeter(cfg.address, token=cfg.admin_token, tls_ca=cfg.tls_ca)
        stats = await run_recommender(cfg.address, mix, load, deadline_s=cfg.deadline_ms / 1000, progress=progress,
                                      meters=[cpu, counters], token=cfg.token, tls_ca=cfg.tls_ca)  # fmt: skip
        out.write("\n")
        return run_record(stats, label=label, cpu=cpu, counters_delta=counters.delta)

    result = BenchResult(workload=mix.params(), notes=f"shardrec bench run against {cfg.address}")
    result.system(cfg.label, description={"address": cfg.address, "processes": sorted(set(cfg.pids.values()))})
    if cfg.sweep:
        sw = run(sweep_async(lambda r: once(OpenLoop(r, cfg.duration_s, cfg.warmup_s, seed=cfg.seed), f"sweep {r:.0f}/s"),
                             cfg.sweep_start_rps, slo_p99_ms=cfg.slo_ms))  # fmt: skip
        result.add_sweep(cfg.label, sw)
    elif cfg.concurrency:
        result.add_run(cfg.label, run(once(ClosedLoop(cfg.concurrency, cfg.duration_s, cfg.warmup_s), "closed")))
    else:
        rate = cfg.rate_rps or 100.0
        result.add_run(cfg.label, run(once(OpenLoop(rate, cfg.duration_s, cfg.warmup_s, seed=cfg.seed), "open")))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.write_json(cfg.out_dir / "run.json")
    doc = result.to_dict()
    plots.latency_cdf(doc, cfg.out_dir / "latency_cdf.png")
    if cfg.sweep:
        plots.sweep_plot(doc, cfg.out_dir / "sweep.png", slo_p99_ms=cfg.slo_ms)
    out.write(format_table(doc) + "\n")
    out.write(f"wrote {cfg.out_dir / 'run.json'} and plots in {cfg.out_dir}\n")
    return doc
