"""Lookup micro-benchmark: what the shard adds above pooling and the gRPC transport floor.

One request = 512 samples x 26 bags x 20 ids (power-law ids) over a 1M x 64 float32 table,
as 26 bag groups in one Lookup; the response is 26 x 512 x 64 float32 (3.4 MB). Measured in
one run, one call in flight, every server in its own process on this machine:

  (a) in-process torch embedding_bag of the same bags (no RPC);
  (b) a gRPC echo: a server answering the same request bytes with same-size response bytes,
      without parsing or pooling (the transport floor);
  (c) the shard's real Lookup servicer (decode, validate, pool, encode) over gRPC.

The three are measured in interleaved rounds (``--rounds`` of ``--iters / rounds`` calls each,
a, b, c in turn), so a change in the machine's load moves all three alike. Target:
(c) <= 1.25 x ((a) + (b)) at p50 over every round; each round's own ratio is reported too.
Prints a table and writes JSON (``--out``).

    python benchmarks/lookup_micro.py [--iters 60] [--rounds 6] [--baseline DIR] [--out bench-results/lookup_micro.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

ROWS, DIM, SAMPLES, BAGS, IDS_PER_BAG = 1_000_000, 64, 512, 26, 20
MAX_MSG = 64 * 1024 * 1024
SEED = 0


def make_table() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((ROWS, DIM), dtype=np.float32)


def make_groups() -> list[tuple[np.ndarray, np.ndarray]]:
    from services.core.synth import power_law_ids

    rng = np.random.default_rng(SEED + 1)
    lengths = np.full(SAMPLES, IDS_PER_BAG, dtype=np.int32)
    return [(power_law_ids(rng, SAMPLES * IDS_PER_BAG, ROWS), lengths) for _ in range(BAGS)]


def make_request():
    from services._proto.shardrec.v1 import embedding_pb2
    from services.core import wire

    req = embedding_pb2.LookupRequest(request_id="bench", version=0)
    for ids, lengths in make_groups():
        g = req.groups.add(table="t", partition=0, pooling=embedding_pb2.POOLING_SUM)
        wire.encode(ids, g.ids)
        wire.encode(lengths, g.lengths)
    return req


def serve(kind: str, port_file: str) -> None:
    """Run one benchmark server in this process until killed."""
    import threading

    import grpc
    import torch

    from services._proto.shardrec.v1 import embedding_pb2
    from services.core import wire
    from services.core.rpc.server import start_sync_server, tune_allocator
    from services.core.types import TableSpec

    torch.set_num_threads(1)
    tune_allocator()  # as the shard process does
    if kind == "echo":
        resp = embedding_pb2.LookupResponse(version=1)
        pooled = np.zeros((SAMPLES, DIM), dtype=np.float32)
        counts = np.full(SAMPLES, IDS_PER_BAG, dtype=np.int32)
        for _ in range(BAGS):
            r = resp.results.add()
            wire.encode(pooled, r.pooled)
            wire.encode(counts, r.counts)
        payload = resp.SerializeToString()
        handler = grpc.method_handlers_generic_handler(
            "shardrec.v1.EmbeddingShard",
            {"Lookup": grpc.unary_unary_rpc_method_handler(lambda req, ctx: payload)},
        )
        add = [lambda s: s.add_generic_rpc_handlers((handler,))]
    else:
        from services.embedding_shard.limits import LookupLimits
        from services.embedding_shard.servicer import EmbeddingShardServicer, add_to_server
        from services.core.types import PartitionId
        from services.embedding_shard.store import TableStore

        spec = TableSpec("t", ROWS, DIM)
        store = TableStore({"t": spec}, {"t": 1})
        store.install(1, {PartitionId("t", 0, 1): torch.from_numpy(make_table())})
        limits = LookupLimits(max_ids=10_000_000, max_bags=10_000_000, max_response_bytes=MAX_MSG)
        servicer = EmbeddingShardServicer("bench", store, limits=limits, map_version=lambda: 1)
        add = [lambda s: add_to_server(servicer, s)]
    server = start_sync_server("127.0.0.1", 0, threads=8, max_message_bytes=MAX_MSG, add_servicers=add, service_names=[])
    pathlib.Path(port_file).write_text(str(server.port))
    threading.Event().wait()


def summarize(samples_s: list[float]) -> dict:
    ms = sorted(x * 1e3 for x in samples_s)
    return {
        "p50_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "p99_ms": ms[int(0.99 * (len(ms) - 1))],
        "mean_ms": statistics.fmean(ms),
        "n": len(ms),
    }


def start_server(kind: str, tmp: str, root: pathlib.Path = ROOT) -> tuple[subprocess.Popen, int]:
    """One server process of ``kind``, from the checkout at ``root`` (its own venv when it has
    one): the port it listens on."""
    port_file = os.path.join(tmp, f"{kind}-{abs(hash(str(root)))}.port")
    python = root / ".venv" / "bin" / "python" if root != ROOT and (root / ".venv").exists() else pathlib.Path(sys.executable)
    script = root / "benchmarks" / "lookup_micro.py"
    proc = subprocess.Popen([str(python), str(script), "--serve", kind, "--port-file", port_file], cwd=root)
    deadline = time.monotonic() + 120
    while not os.path.exists(port_file) or not pathlib.Path(port_file).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} server did not start")
        time.sleep(0.05)  # polling a file another process writes; nothing to await
    return proc, int(pathlib.Path(port_file).read_text())


class RpcTimer:
    """Lookup calls over one open channel; ``time(n)`` times ``n`` of them, the client decoding
    every answer as a frontend would."""

    def __init__(self, port: int, request_bytes: bytes) -> None:
        from services._proto.shardrec.v1 import embedding_pb2
        from services.core.clients import make_channel

        self._channel = make_channel(f"127.0.0.1:{port}", max_message_bytes=MAX_MSG, aio=False)
        self._call = self._channel.unary_unary(
            "/shardrec.v1.EmbeddingShard/Lookup",
            request_serializer=None,
            response_deserializer=embedding_pb2.LookupResponse.FromString,
        )
        self._request = request_bytes

    def time(self, n: int) -> list[float]:
        from services.core import wire

        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = self._call(self._request, timeout=30)
            for r in resp.results:
                wire.decode(r.pooled, "pooled", dtype="float32", ndim=2)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self._channel.close()


def time_inproc(weight, groups, n: int) -> list[float]:
    from services.core import pooling
    from services.core.types import PoolingType

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        for ids, lengths in groups:
            pooling.pool(weight, ids, lengths, PoolingType.SUM)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=60, help="calls measured per path, over every round")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (a, b, c in turn)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--baseline", default=None,
                    help="another checkout (e.g. a `git worktree` of an older commit): its shard is measured in the same rounds, as (c0)")
    ap.add_argument("--out", default="bench-results/lookup_micro.json")
    ap.add_argument("--serve", choices=["echo", "shard"], help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port_file)
        return 0

    import torch

    from services.core.rpc.server import tune_allocator

    torch.set_num_threads(1)
    tune_allocator()
    request_bytes = make_request().SerializeToString()
    groups = make_groups()
    per_round = max(1, args.iters // args.rounds)
    servers = [("b", "echo", ROOT), ("c", "shard", ROOT)] + ([("c0", "shard", pathlib.Path(args.baseline).resolve())] if args.baseline else [])
    samples: dict[str, list[float]] = {"a": [], **{key: [] for key, _, _ in servers}}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start_server(kind, tmp, root) for _, kind, root in servers]
        timers = {key: RpcTimer(port, request_bytes) for (key, _, _), (_, port) in zip(servers, procs)}
        try:
            weight = torch.from_numpy(make_table())
            time_inproc(weight, groups, args.warmup)
            for timer in timers.values():
                timer.time(args.warmup)
            for _ in range(args.rounds):
                got = {"a": time_inproc(weight, groups, per_round), **{k: t.time(per_round) for k, t in timers.items()}}
                med = {k: statistics.median(v) for k, v in got.items()}
                row = {f"{k}_p50_ms": round(v * 1e3, 3) for k, v in med.items()}
                for k, v in got.items():
                    samples[k] += v
                for c in ("c", "c0"):
                    if c in med:
                        row[f"{c}_over_a_plus_b"] = round(med[c] / (med["a"] + med["b"]), 3)
                rounds.append(row)
        finally:
            for timer in timers.values():
                timer.close()
            for proc, _ in procs:
                proc.kill()
                proc.wait()
    names = {"a": "a_inproc_embedding_bag", "b": "b_grpc_echo", "c": "c_shard_lookup", "c0": "c0_baseline_shard_lookup"}
    result = {
        "benchmark": "lookup_micro",
        "shape": {"samples": SAMPLES, "bags": BAGS, "ids_per_bag": IDS_PER_BAG, "rows": ROWS, "dim": DIM},
        "request_bytes": len(request_bytes),
        "baseline": str(pathlib.Path(args.baseline).resolve()) if args.baseline else None,
        **{names[k]: summarize(v) for k, v in samples.items()},
        "rounds": rounds,
    }
    floor = result["a_inproc_embedding_bag"]["p50_ms"] + result["b_grpc_echo"]["p50_ms"]
    result["c_over_a_plus_b_p50"] = result["c_shard_lookup"]["p50_ms"] / floor
    result["a_over_c_p50"] = result["a_inproc_embedding_bag"]["p50_ms"] / result["c_shard_lookup"]["p50_ms"]
    result["target_c_over_a_plus_b"] = 1.25
    print(f"{'':28s}{'p50 ms':>9s}{'p90 ms':>9s}{'p99 ms':>9s}")
    for key in samples:
        r = result[names[key]]
        print(f"{names[key]:28s}{r['p50_ms']:9.2f}{r['p90_ms']:9.2f}{r['p99_ms']:9.2f}")
    print("per round (c)/((a)+(b)): " + " ".join(f"{r['c_over_a_plus_b']:.3f}" for r in rounds))
    print(f"(c) / ((a)+(b)) at p50: {result['c_over_a_plus_b_p50']:.3f}  (target <= 1.25);  (a)/(c): {result['a_over_c_p50']:.3f}")
    if args.baseline:
        result["c0_over_a_plus_b_p50"] = result["c0_baseline_shard_lookup"]["p50_ms"] / floor
        print("per round (c0)/((a)+(b)): " + " ".join(f"{r['c0_over_a_plus_b']:.3f}" for r in rounds))
        print(f"baseline (c0) / ((a)+(b)) at p50: {result['c0_over_a_plus_b_p50']:.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
