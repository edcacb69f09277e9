"""Recommend latency probe: one client, one call in flight, 1 user x N candidates.

    python benchmarks/recommend_latency.py --address HOST:PORT [--calls 300] [--candidates 100]
        [--users 200000] [--items 500000]

Users and candidates follow the demo model's power law. Prints p50/p90/p99 in ms. (The load
harness with open/closed loops and baselines is ``shardrec bench``.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    import numpy as np

    from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
    from services.core.clients import make_channel
    from services.core.synth import power_law_ids

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    lat = []
    with make_channel(args.address, aio=False) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        for i in range(args.warmup + args.calls):
            req = recommend_pb2.RecommendRequest(
                request_id=f"probe-{i}",
                user_id=int(power_law_ids(rng, 1, args.users)[0]),
                candidate_item_ids=power_law_ids(rng, args.candidates, args.items).tolist(),
                top_k=10,
            )
            t0 = time.perf_counter()
            stub.Recommend(req, timeout=5)
            if i >= args.warmup:
                lat.append((time.perf_counter() - t0) * 1e3)
    q = np.percentile(lat, [50, 90, 99])
    print(f"{args.address}: {len(lat)} calls, 1 user x {args.candidates} candidates: p50 {q[0]:.2f} ms  p90 {q[1]:.2f} ms  p99 {q[2]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
