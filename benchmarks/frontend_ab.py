"""Interleaved A/B runs of frontend variants over one local cluster (docs/benchmarks.md).

    python benchmarks/frontend_ab.py --variant nocache= --variant "cache=--cache-bytes 18M" \\
        [--rate 150] [--rounds 3] [--sweep] [--preset demo] [--spec deploy/placement/mixed.json]

One cluster (ZooKeeper, Redis with the stored features, the shards); one frontend process per
variant, each with its own flags over the same shards (a variant with ``--lookup redis-kv``
gets the rows loaded and ``--checkpoint``). Each variant is primed on the first range of the
seeded request mix, then every round runs the variants in turn (order alternating round to
round), all of them on the round's own, fresh range of the mix: no variant is measured on
requests it has seen. Per run: latency, CPU per request of the variant's processes (its
frontend, the shards and Redis) and of its frontend alone, wire bytes, RPCs and cache hits
per request from the frontend's counters. ``--profile DIR``: py-spy (``pip install py-spy``)
samples each variant's frontend through its first run (raw folded stacks, ``DIR/<variant>.txt``,
idle samples left out). ``--sweep``: per round and variant, a saturation
sweep (p99 <= SLO), each step on a fresh range too. Prints every run and the medians, and
writes ``<out>/ab.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.localcluster.config import LocalClusterConfig, resolve_spec
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.state import ROLE_REDIS, ROLE_SHARD


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]


def parse_variant(raw: str) -> Variant:
    name, _, args = raw.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {raw!r}")
    return Variant(name, tuple(shlex.split(args)))


class Ranges:
    """Consecutive, disjoint ranges of request indices: each run takes a fresh one."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> int:
        start, self.next = self.next, self.next + n
        return start


def start_variants(cluster: LocalCluster, variants: list[Variant]) -> dict[str, dict]:
    ck = str(cluster.config.checkpoint)
    shards = cluster.pids(ROLE_SHARD)
    redis = cluster.pids(ROLE_REDIS)
    out = {}
    loaded = False
    for v in variants:
        args = list(v.args)
        remote = True
        if "redis-kv" in args:
            if not loaded:  # once for every redis-kv variant
                cluster.run_job("load-kv", "loading embedding rows into Redis for redis-kv",
                                ["bench", "load-kv", "--checkpoint", ck, "--redis", cluster.state.redis_url])  # fmt: skip
                loaded = True
            args += ["--checkpoint", ck]
            remote = False
        elif "inproc" in args:
            args += ["--checkpoint", ck]
            remote = False
        name = f"frontend-{v.name}"
        address = cluster.start_frontend(name, args)
        frontend_pid = cluster.pids()[name]
        pids = {frontend_pid: name, **{pid: n for n, pid in redis.items()}}
        if remote:
            pids.update({pid: n for n, pid in shards.items()})
        out[v.name] = {"address": address, "pids": pids, "frontend_pid": frontend_pid}
    return out


def with_variants(args, variants: list[Variant], measure: Callable[[LocalCluster, dict[str, dict]], dict]) -> dict:
    """A bench cluster from ``args`` (``workdir``, ``spec``, ``preset``, ``nodes``, ``seed``),
    one frontend per variant (``start_variants``), ``measure(cluster, systems)``; everything is
    stopped after, whatever happens."""
    cfg = LocalClusterConfig(workdir=Path(args.workdir).resolve(), spec=resolve_spec(args.spec), preset=args.preset,
                             nodes=args.nodes, seed=args.seed, cluster="bench")  # fmt: skip
    with SignalGuard() as guard:
        cluster = LocalCluster(cfg, sys.stdout, guard, mode="bench")
        try:
            cluster.start()
            return measure(cluster, start_variants(cluster, variants))
        finally:
            cluster.stop()


def write_doc(out: str, name: str, doc: dict) -> Path:
    """``doc`` as JSON in ``out/name`` (the folder made if needed)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def summary(record: dict, frontend: str) -> dict:
    """The figures of one run record (``run_record``) that the table shows."""
    n = record["requests_in_window"] or 1
    d = record.get("counters_delta") or {}
    by = (record.get("cpu") or {}).get("by_process", {})
    hits, misses = d.get("cache_hits", 0), d.get("cache_misses", 0)
    wire = record.get("wire_bytes_per_request") or {}
    return {
        "offered_rps": record["offered_rps"],
        "throughput_rps": record["throughput_rps"],
        "p50_ms": record["latency_ms"]["p50_ms"],
        "p99_ms": record["latency_ms"]["p99_ms"],
        "errors": record["error_share"],
        "cpu_ms": 1e3 * (record["cpu_seconds_per_request"] or 0.0),
        "frontend_cpu_ms": 1e3 * by.get(frontend, 0.0) / n,
        "wire_b": wire.get("total"),
        "rpcs": d.get("lookup_rpcs", 0) / n,
        "batch": d.get("requests_batched", 0) / max(1, d.get("batches", 0)),
        "hit_rate": hits / (hits + misses) if hits + misses else None,
    }


async def measure(args, variants: list[Variant], systems: dict[str, dict], out) -> dict:
    from benchmarks.harness import ClosedLoop, CounterMeter, CpuMeter, OpenLoop, RequestMix, run_recommender, run_record
    from benchmarks.harness.sweep import sweep_async

    mix = RequestMix(args.preset, candidates=args.candidates, seed=args.seed)
    ranges = Ranges()

    def source(start: int):
        return lambda i: mix.request(start + i)

    async def at_rate(v: Variant, rate: float, duration_s: float, start: int, profile: Path | None = None) -> dict:
        sysd = systems[v.name]
        cpu, counters = CpuMeter(sysd["pids"]), CounterMeter(sysd["address"])
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            subprocess.Popen(["py-spy", "record", "--nonblocking", "--format", "raw", "-r", "200", "-d", str(int(args.warmup_s + duration_s)),
                              "-p", str(sysd["frontend_pid"]), "-o", str(profile / f"{v.name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stats = await run_recommender(sysd["address"], source(start), OpenLoop(rate, duration_s, args.warmup_s, seed=args.seed),
                                      deadline_s=args.deadline_s, meters=[cpu, counters])
        rec = run_record(stats, label=f"{v.name} {rate:.0f}/s", cpu=cpu, counters_delta=counters.delta)
        rec["counters_delta"] = counters.delta
        return rec

    prime = ranges.take(int(args.prime_s * 400) + 1000)
    for v in variants:  # every variant primes on the same first range
        await run_recommender(systems[v.name]["address"], source(prime), ClosedLoop(8, args.prime_s), deadline_s=args.deadline_s)
    doc: dict = {"variants": {v.name: list(v.args) for v in variants}, "runs": [], "sweeps": []}
    per_run = int(args.rate * (args.duration_s + args.warmup_s) * 1.2) + 100
    for r in range(args.rounds):
        start = ranges.take(per_run)
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            rec = await at_rate(v, args.rate, args.duration_s, start, Path(args.profile) if args.profile and r == 0 else None)
            s = summary(rec, f"frontend-{v.name}")
            doc["runs"].append({"round": r, "variant": v.name, "range_start": start, **s, "record": rec})
            out.write(f"round {r} {v.name:<12} " + " ".join(f"{k} {_fmt(x)}" for k, x in s.items()) + "\n")
            out.flush()
        if args.sweep:
            for v in order:
                async def step(rate: float, v=v) -> dict:
                    return await at_rate(v, rate, args.sweep_duration_s, ranges.take(int(rate * (args.sweep_duration_s + args.warmup_s) * 1.2) + 100))

                res = await sweep_async(step, args.sweep_start, slo_p99_ms=args.slo_ms, factor=args.sweep_factor, max_steps=args.sweep_steps)
                doc["sweeps"].append({"round": r, "variant": v.name, "saturation_rps": res.saturation_rps,
                                      "points": [p.to_dict() for p in res.points]})  # fmt: skip
                out.write(f"round {r} {v.name:<12} saturation {res.saturation_rps}\n")
                out.flush()
    doc["medians"] = medians(doc, variants)
    return doc


def medians(doc: dict, variants: list[Variant]) -> dict:
    out = {}
    for v in variants:
        runs = [x for x in doc["runs"] if x["variant"] == v.name]
        m = {k: statistics.median([x[k] for x in runs]) for k in runs[0] if k not in ("round", "variant", "range_start", "record")
             and all(isinstance(x[k], (int, float)) for x in runs)}  # fmt: skip
        sats = [s["saturation_rps"] for s in doc["sweeps"] if s["variant"] == v.name and s["saturation_rps"]]
        if sats:
            m["saturation_rps"] = statistics.median(sats)
        out[v.name] = m
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME=FLAGS of one frontend (repeat)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--spec", default="deploy/placement/mixed.json")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--workdir", default="var/bench-ab")
    p.add_argument("--out", default="bench-results/ab")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--rate", type=float, default=150.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--prime-s", type=float, default=10.0)
    p.add_argument("--deadline-s", type=float, default=1.0)
    p.add_argument("--profile", default="", metavar="DIR", help="py-spy each variant's frontend through its first run")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-start", type=float, default=100.0)
    p.add_argument("--sweep-factor", type=float, default=1.15)
    p.add_argument("--sweep-steps", type=int, default=12)
    p.add_argument("--sweep-duration-s", type=float, default=5.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from benchmarks.harness import run

    doc = with_variants(args, args.variant, lambda _cluster, systems: run(measure(args, args.variant, systems, sys.stdout)))
    write_doc(args.out, "ab.json", doc)
    for name, m in doc["medians"].items():
        print(f"median {name:<12} " + " ".join(f"{k} {_fmt(x)}" for k, x in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
