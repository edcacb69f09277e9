"""The error of float16 pooled vectors on the wire (``--pooled-dtype float16``; docs/fanout.md).

    python benchmarks/float16_error.py [--preset demo] [--requests 300] [--reference 40]

One local cluster (``--spec`` placement), two frontends over the same shards: float32 and
float16 pooled vectors. The same requests of the seeded mix (every candidate ranked) go to both;
prints the largest absolute and relative score difference between them, how many requests'
top-10 changed, and, for the first ``--reference`` requests, both frontends' largest difference
to ``core.reference``. Not a timing run: one request at a time, any machine load.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.frontend_ab import Variant, with_variants, write_doc


def scores_of(resp, n: int) -> np.ndarray:
    out = np.full(n, np.nan, dtype=np.float32)
    for it in resp.items:
        out[it.position] = it.score
    return out


def measure(args, addresses: dict[str, str], checkpoint: str) -> dict:
    from benchmarks.harness import RequestMix
    from services._proto.shardrec.v1 import recommend_pb2_grpc
    from services.core.clients import make_channel
    from services.core.reference import ReferenceRecommender

    mix = RequestMix(args.preset, candidates=args.candidates, seed=args.seed)
    stubs = {name: recommend_pb2_grpc.RecommenderStub(make_channel(a, aio=False)) for name, a in addresses.items()}
    reference = ReferenceRecommender(checkpoint) if args.reference else None
    worst_abs = worst_rel = 0.0
    ref_abs = {name: 0.0 for name in stubs}
    top_changed = 0
    for i in range(args.requests):
        req = mix.request(args.start + i)
        req.top_k = len(req.candidate_item_ids)
        n = req.top_k
        got = {name: scores_of(stub.Recommend(req, timeout=10), n) for name, stub in stubs.items()}
        a, b = got["float32"].astype(np.float64), got["float16"].astype(np.float64)
        diff = np.abs(a - b)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(a), 1e-12)).max()))
        k = min(10, n)
        top_changed += list(np.argsort(-a, kind="stable")[:k]) != list(np.argsort(-b, kind="stable")[:k])
        if reference is not None and i < args.reference:
            overrides = {name: (list(f.values), list(f.weights) or None) for name, f in req.sparse_features.items()}
            want = reference.scores(req.user_id, list(req.candidate_item_ids), dict(req.dense_features), overrides).astype(np.float64)
            for name, s in got.items():
                ref_abs[name] = max(ref_abs[name], float(np.abs(s - want).max()))
    return {"requests": args.requests, "candidates": args.candidates, "max_abs_float16_vs_float32": worst_abs,
            "max_rel_float16_vs_float32": worst_rel, "top10_changed_requests": top_changed,
            "reference_requests": min(args.reference, args.requests), "max_abs_vs_reference": ref_abs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--spec", default="deploy/placement/mixed.json")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--workdir", default="var/bench-float16")
    p.add_argument("--out", default="bench-results/float16")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--reference", type=int, default=40, help="of those, how many are checked against core.reference too")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--start", type=int, default=0, help="first request index of the seeded mix")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    variants = [Variant("float32", ()), Variant("float16", ("--pooled-dtype", "float16"))]
    doc = with_variants(args, variants, lambda cluster, systems: measure(
        args, {name: s["address"] for name, s in systems.items()}, str(cluster.config.checkpoint)))  # fmt: skip
    write_doc(args.out, "float16.json", doc)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
