"""CPU per Recommend with observability on (metrics endpoint scraped by Prometheus, traces
sampled at 1% to a span file) against off (no endpoint, no histograms, no tracing):
interleaved pairs on two identical local clusters (docs/observability.md, "Cost").

    python benchmarks/observability_cost.py [--pairs 5] [--rate 100] [--duration-s 10] [--out FILE]

CPU is summed over the frontend and shard processes of each cluster (``CpuMeter``) over the
measured window and divided by the Recommend calls completed in it. Runs alternate order pair
by pair (off, on / on, off, ...) so drift on a shared machine falls on both sides.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    from benchmarks.harness import CpuMeter, OpenLoop, RequestMix, run, run_recommender
    from services.localcluster.config import DEFAULT_SPEC, LocalClusterConfig, resolve_spec
    from services.localcluster.launcher import LocalCluster
    from services.localcluster.processes import SignalGuard
    from services.localcluster.state import ROLE_FRONTEND, ROLE_SHARD

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=100.0, help="Recommend calls per second (open loop)")
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workdir", default="var/observability-cost")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    work = pathlib.Path(args.workdir).resolve()
    spans = work / "on" / "spans.jsonl"
    common = dict(spec=resolve_spec(DEFAULT_SPEC), preset=args.preset, nodes=3, start_timeout_s=180.0, stop_grace_s=5.0)
    configs = {
        "off": LocalClusterConfig(workdir=work / "off", cluster="cost-off", metrics=False, service_args=("--trace-sample", "0"), **common),
        "on": LocalClusterConfig(workdir=work / "on", cluster="cost-on", prometheus=True, scrape_interval_s=5.0,
                                 service_args=("--trace-sample", "0.01", "--trace-file", str(spans)), **common),
    }  # fmt: skip
    guard = SignalGuard()
    clusters = {k: LocalCluster(c, io.StringIO(), guard, mode="bench") for k, c in configs.items()}
    mix = RequestMix(args.preset, candidates=100, seed=0)
    pairs: list[dict] = []
    try:
        for name, cluster in clusters.items():
            print(f"starting the '{name}' cluster in {cluster.config.workdir}", flush=True)
            cluster.start()

        def measure(name: str) -> float:
            cluster = clusters[name]
            pids = {pid: n for n, pid in cluster.pids(ROLE_FRONTEND, ROLE_SHARD).items()}
            cpu = CpuMeter(pids)
            stats = run(run_recommender(cluster.state.frontend, mix, OpenLoop(args.rate, args.duration_s, args.warmup_s, seed=0), meters=[cpu]))
            return cpu.seconds / max(1, stats.completed_in_window)

        for name in clusters:  # warm both: first-touch of the tables, caches, JIT of nothing
            measure(name)
        for i in range(args.pairs):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            got = {name: measure(name) for name in order}
            pair = {"off_cpu_ms": got["off"] * 1e3, "on_cpu_ms": got["on"] * 1e3, "ratio": got["on"] / got["off"], "order": list(order)}
            pairs.append(pair)
            print(f"pair {i + 1}: off {pair['off_cpu_ms']:.3f} ms, on {pair['on_cpu_ms']:.3f} ms CPU per Recommend: on/off {pair['ratio']:.4f}", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    median = statistics.median(p["ratio"] for p in pairs)
    print(f"median on/off over {len(pairs)} pairs: {median:.4f} ({(median - 1) * 100:+.1f}%)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"rate": args.rate, "duration_s": args.duration_s, "pairs": pairs, "median_ratio": median}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
