"""What one refused Recommend costs the frontend (docs/overload.md, docs/benchmarks.md "Overload").

    python benchmarks/refusal_cost.py [--preset small] [--calls 5000] [--rounds 3]

One local cluster and a frontend whose every call is over its caller rate (``--caller-rate-rps
0.001 --caller-burst 1``), so each Recommend is refused by admission. A client with 64 calls
in flight sends ``--calls`` Recommends, then as many gRPC health checks, to that
frontend, per round; the frontend process's CPU (user + system, every thread) over each batch
of calls, divided by the calls, is the cost of one refusal and of one bare gRPC call in the
same process (gRPC's own floor). Every refusal is checked to be RESOURCE_EXHAUSTED with a
retry hint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

from benchmarks.frontend_ab import Variant, with_variants, write_doc
from benchmarks.harness.cpu import CpuMeter

REFUSING = Variant("refusing", ("--caller-rate-rps", "0.001", "--caller-burst", "1"))


async def cpu_per_call(address: str, pid: int, method: str, body: bytes, calls: int, check=None) -> float:
    """Frontend CPU microseconds per call of ``method`` (after a warm-up of 300 calls)."""
    import grpc

    from services.core.clients import make_channel

    channel = make_channel(address)
    stub = channel.unary_unary(method)
    gate = asyncio.Semaphore(64)

    async def one(check) -> None:
        async with gate:
            try:
                await stub(body, timeout=10)
                if check is not None:
                    check(None)
            except grpc.RpcError as e:
                if check is None:
                    raise
                check(e)

    try:
        await asyncio.gather(*(one(lambda _e: None) for _ in range(300)))  # warm-up (the first call has its token)
        meter = CpuMeter({pid: "frontend"})
        meter.start()
        await asyncio.gather(*(one(check) for _ in range(calls)))
        meter.stop()
        return meter.seconds / calls * 1e6
    finally:
        await channel.close()


def refused(error) -> None:
    import grpc

    from services.core.rpc.errors import retry_delay_s

    if error is None or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or retry_delay_s(error) is None:
        raise AssertionError(f"expected RESOURCE_EXHAUSTED with RetryInfo, got {error!r}")


def measure(address: str, pid: int, calls: int, rounds: int) -> dict:
    from grpc_health.v1 import health_pb2

    from services._proto.shardrec.v1 import recommend_pb2

    rec = recommend_pb2.RecommendRequest(user_id=42, candidate_item_ids=range(100), top_k=10, request_id="r1").SerializeToString()
    health = health_pb2.HealthCheckRequest(service="").SerializeToString()
    refusal, bare = [], []
    for _ in range(rounds):
        refusal.append(asyncio.run(cpu_per_call(address, pid, "/shardrec.v1.Recommender/Recommend", rec, calls, refused)))
        bare.append(asyncio.run(cpu_per_call(address, pid, "/grpc.health.v1.Health/Check", health, calls)))
    return {
        "calls": calls,
        "rounds": rounds,
        "refusal_us": [round(x, 1) for x in refusal],
        "health_check_us": [round(x, 1) for x in bare],
        "median_refusal_us": round(statistics.median(refusal), 1),
        "median_health_check_us": round(statistics.median(bare), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--spec", default="deploy/placement/mixed.json")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--workdir", default="var/bench-refusal")
    p.add_argument("--out", default="bench-results/refusal")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    doc = with_variants(args, [REFUSING], lambda _cluster, systems: measure(
        systems["refusing"]["address"], systems["refusing"]["frontend_pid"], args.calls, args.rounds))  # fmt: skip
    write_doc(args.out, "refusal.json", doc)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
