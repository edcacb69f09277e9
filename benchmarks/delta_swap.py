"""Incremental checkpoints, measured: the cost of applying a delta, and latency during swaps.

``apply``: the shard's own code path, in this process. Load one table (P = 1) of a checkpoint
into a ``TableStore``, write a drift delta of ``--drift`` of its rows, then time reading the
delta's rows (``loader.load_changes``) and the in-place swap (``TableStore.apply``), and measure this
process's USS (``/proc/self/smaps_rollup``) before and after, while both versions are held::

    python benchmarks/delta_swap.py apply --preset large --table users --drift 0.01

``during``: a local cluster (``shardrec bench`` machinery), an open loop at ``--rate`` for
``--duration-s`` with no publishing, then the same open loop while ``--deltas`` drift deltas are
published one after another (each once the previous one is served); ``--pairs N`` repeats the
two windows in turn. Each window sends its own requests of the mix. Prints p50/p99/p99.9/max and
errors for every window, p99 during / steady per pair and its median, and writes JSON::

    python benchmarks/delta_swap.py during --preset demo --rate 100 --deltas 3 [--pairs 3]
        [--frontend-args '--admission off'] [--shard-args '--swap-cpu-share 1']

Deltas written to the cluster's checkpoint are removed at the end, so the next run starts from
the base again.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def uss_bytes(pid: int | str = "self") -> int:
    """Private clean + private dirty bytes of a process, from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def ensure_model(root: pathlib.Path, preset: str) -> None:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.synth import synthesize

    if not CheckpointReader(root).complete_versions():
        print(f"synthesizing the {preset} preset at {root} ...", flush=True)
        t0 = time.monotonic()
        synthesize(root, preset)
        print(f"  done in {time.monotonic() - t0:.1f}s", flush=True)


def cmd_apply(args: argparse.Namespace) -> dict:
    import torch

    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.writer import next_version, write_delta
    from services.core.synth_deltas import drift_ids, drift_rows
    from services.core.types import PartitionId
    from services.embedding_shard.loader import load_changes, load_rows, loaders_for
    from services.embedding_shard.store import TableStore

    torch.set_num_threads(1)
    root = pathlib.Path(args.checkpoint or ROOT / "bench-results" / "models" / args.preset)
    ensure_model(root, args.preset)
    reader = CheckpointReader(root)
    base = reader.complete_versions()[0]
    spec = reader.manifest(base).model
    table = spec.table(args.table)
    key = PartitionId(table.name, 0, 1)
    store = TableStore({table.name: table}, {table.name: 1})
    t0 = time.monotonic()
    store.install(base, load_rows(loaders_for(reader, base, [key])))
    load_s = time.monotonic() - t0
    k = drift_rows(table.rows, args.drift)
    rng = np.random.default_rng(args.seed)
    ids = drift_ids(rng, k, table.rows)
    rows = rng.normal(0.0, 2.0, size=(k, table.dim)).astype(np.float32)
    version = next_version(root)
    write_delta(root, version, base, spec, {table.name: (ids, rows)})
    try:
        before = uss_bytes()
        t0 = time.monotonic()
        reader.verify(version, full=True)
        verify_s = time.monotonic() - t0
        t0 = time.monotonic()
        changes = load_changes(loaders_for(reader, version, [key], over=base))
        read_s = time.monotonic() - t0
        t0 = time.monotonic()
        store.apply(version, changes)
        swap_s = time.monotonic() - t0
        del changes
        after = uss_bytes()
    finally:
        shutil.rmtree(root / "versions" / str(version), ignore_errors=True)
    delta_bytes = k * table.dim * 4
    out = {
        "benchmark": "delta_apply",
        "preset": args.preset,
        "table": table.name,
        "rows": table.rows,
        "dim": table.dim,
        "table_bytes": table.rows * table.dim * 4,
        "delta_rows": k,
        "delta_bytes": delta_bytes,
        "load_base_s": round(load_s, 3),
        "verify_delta_s": round(verify_s, 3),
        "read_rows_s": round(read_s, 3),
        "swap_s": round(swap_s, 3),
        "apply_total_s": round(verify_s + read_s + swap_s, 3),
        "uss_growth_bytes": after - before,
        "overlay_bytes": store.overlay_bytes(),
        "versions_held": store.versions_ready,
    }
    print(
        f"{table.name}: {table.rows:,} x {table.dim} ({out['table_bytes'] / 2**30:.2f} GiB), delta {k:,} rows "
        f"({delta_bytes / 2**20:.1f} MiB)\n"
        f"  apply: verify {verify_s:.2f}s + read rows {read_s:.2f}s + swap {swap_s:.3f}s = {out['apply_total_s']:.2f}s\n"
        f"  memory while both versions are held: USS +{(after - before) / 2**20:.1f} MiB "
        f"(overlay {store.overlay_bytes() / 2**20:.1f} MiB; one table copy would be {out['table_bytes'] / 2**20:.0f} MiB)"
    )
    return out


def cmd_during(args: argparse.Namespace) -> dict:
    import shlex
    import statistics

    from benchmarks.harness import OpenLoop, RequestMix, run, run_recommender
    from services.control.cluster import open_cluster
    from services.core.synth_deltas import synthesize_deltas
    from services.localcluster.config import LocalClusterConfig, resolve_spec
    from services.localcluster.launcher import LocalCluster
    from services.localcluster.processes import SignalGuard

    workdir = pathlib.Path(args.workdir).resolve()
    cfg = LocalClusterConfig(
        workdir=workdir, spec=resolve_spec(args.spec), preset=args.preset, nodes=args.nodes, cluster="delta-bench",
        frontend_args=tuple(shlex.split(args.frontend_args)), shard_args=tuple(shlex.split(args.shard_args)),
    )  # fmt: skip
    mix = RequestMix(args.preset, candidates=args.candidates, seed=0)
    written: list[int] = []
    result: dict = {"benchmark": "delta_swap", "preset": args.preset, "rate_rps": args.rate, "duration_s": args.duration_s,
                    "frontend_args": args.frontend_args, "shard_args": args.shard_args, "pairs": []}  # fmt: skip
    address: list[str] = []
    offset = [0]

    def window(label: str) -> dict:
        # Each window sends its own requests of the mix (never one it sent already).
        start = offset[0]
        offset[0] += 1 << 20
        stats = run(run_recommender(address[0], lambda i: mix.request(start + i), OpenLoop(args.rate, args.duration_s, 2.0, seed=0), deadline_s=1.0))
        h = stats.histogram
        row = {
            "label": label,
            "ok": stats.ok,
            "errors": stats.errors_with_overload(),
            **{f"p{p:g}_ms": round(h.percentile_ms(p), 2) for p in (50, 99, 99.9)},
            "max_ms": round(h.max_ms(), 2),
        }
        print(f"  {label:<22} " + " ".join(f"{k}={v}" for k, v in row.items() if k != "label"), flush=True)
        return row

    with SignalGuard() as guard:
        cluster = LocalCluster(cfg, sys.stdout, guard, mode="bench")
        try:
            cluster.start()
            address.append(cluster.state.frontend)
            with open_cluster(cluster.state.zk, cfg.cluster) as (_zk, store):
                serving = store.read_serving_version()
            total = args.deltas * args.pairs
            print(f"writing {total} drift deltas of {args.drift:.1%} over version {serving} ...", flush=True)
            written = synthesize_deltas(cfg.checkpoint, args.preset, total, drift=args.drift, seed=7, first_parent=serving)
            for k in range(args.pairs):
                versions = written[k * args.deltas : (k + 1) * args.deltas]
                steady = window("steady")
                # The publisher is its own process (as an operator's CLI would be), so its work
                # never competes with the load client's event loop for this process's GIL.
                publisher = subprocess.Popen(
                    [sys.executable, __file__, "publish-chain", "--zk", cluster.state.zk, "--cluster", cfg.cluster,
                     "--start-delay-s", "2", "--interval-s", str(args.interval_s), *map(str, versions)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                during = window(f"during {len(versions)} swaps")
                out, _ = publisher.communicate(timeout=120)
                swaps = json.loads(out.strip().splitlines()[-1])
                ratio = during["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] else None
                result["pairs"].append({"steady": steady, "during": during, "swaps": swaps, "p99_during_over_steady": ratio})
                print(f"  swaps: {[s['publish_to_served_s'] for s in swaps]} s publish to served; p99 during / steady {ratio:.2f}", flush=True)
        finally:
            cluster.stop()
            for v in written:
                shutil.rmtree(cfg.checkpoint / "versions" / str(v), ignore_errors=True)
    pairs = result["pairs"]
    result["steady"], result["during"], result["swaps"] = pairs[0]["steady"], pairs[0]["during"], [s for p in pairs for s in p["swaps"]]
    ratios = [p["p99_during_over_steady"] for p in pairs if p["p99_during_over_steady"] is not None]
    result["median_p99_during_over_steady"] = statistics.median(ratios) if ratios else None
    served = [s["publish_to_served_s"] for s in result["swaps"]]
    result["publish_to_served_s"] = {"min": min(served), "median": statistics.median(served), "max": max(served)} if served else None
    print(f"p99 during / steady per pair: {[round(r, 2) for r in ratios]}, median {result['median_p99_during_over_steady']}; "
          f"publish to served {result['publish_to_served_s']}")  # fmt: skip
    return result


def cmd_publish_chain(args: argparse.Namespace) -> None:
    """Publish each version once the previous one is served; print one JSON line of timings."""
    from services.control.cluster import open_cluster
    from services.control.publish import model_reader, publish_version

    served, latest = threading.Condition(), [0]

    def on_served(v: int | None) -> None:  # kazoo thread: record and wake, nothing else
        with served:
            latest[0] = v or 0
            served.notify_all()

    log = []
    with open_cluster(args.zk, args.cluster) as (_zk, store):
        reader = model_reader(store)
        store.watch_serving_version(on_served)
        time.sleep(args.start_delay_s)  # a pause in the load generator's measured window, by design
        for v in args.versions:
            t0, published = time.monotonic(), time.time()
            publish_version(store, reader, v)
            with served:
                if not served.wait_for(lambda v=v: latest[0] == v, 60):
                    raise SystemExit(f"version {v} was not served within 60 s")
            log.append({"version": v, "published_unix": round(published, 3), "publish_to_served_s": round(time.monotonic() - t0, 3)})
            time.sleep(max(0.0, t0 + args.interval_s - time.monotonic()))
    print(json.dumps(log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="time and memory of applying one delta to one table, in process")
    a.add_argument("--preset", default="large")
    a.add_argument("--checkpoint", default=None, help="checkpoint root (default bench-results/models/<preset>, synthesized if empty)")
    a.add_argument("--table", default="users")
    a.add_argument("--drift", type=float, default=0.01)
    a.add_argument("--seed", type=int, default=3)
    a.set_defaults(func=cmd_apply)
    d = sub.add_parser("during", help="latency of a local cluster before and during delta swaps")
    d.add_argument("--preset", default="demo")
    d.add_argument("--spec", default="deploy/placement/mixed.json")
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    d.add_argument("--rate", type=float, default=100.0)
    d.add_argument("--duration-s", type=float, default=15.0)
    d.add_argument("--candidates", type=int, default=100)
    d.add_argument("--deltas", type=int, default=3)
    d.add_argument("--drift", type=float, default=0.01)
    d.add_argument("--interval-s", type=float, default=3.0, help="at least this long from one publish to the next (0: back to back)")
    d.add_argument("--pairs", type=int, default=1, help="steady and during windows, in turn, this many times (the ratio's median)")
    d.add_argument("--frontend-args", default="", help="further frontend flags, e.g. '--admission off' (nothing shed)")
    d.add_argument("--shard-args", default="", help="further shard flags, e.g. '--swap-cpu-share 1' (unpaced swaps)")
    d.set_defaults(func=cmd_during)
    pc = sub.add_parser("publish-chain", help=argparse.SUPPRESS)
    pc.add_argument("--zk", required=True)
    pc.add_argument("--cluster", required=True)
    pc.add_argument("--start-delay-s", type=float, default=0.0)
    pc.add_argument("--interval-s", type=float, default=0.0, help="at least this long from one publish to the next")
    pc.add_argument("versions", type=int, nargs="+")
    pc.set_defaults(func=cmd_publish_chain)
    for q in (a, d):
        q.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    result = args.func(args)
    if getattr(args, "out", None):
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
