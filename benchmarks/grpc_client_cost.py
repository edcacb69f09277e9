"""Client CPU per unary call by gRPC client style, for the frontend's fan-out (docs/benchmarks.md).

    python benchmarks/grpc_client_cost.py [--batches 2000] [--fan-out 3] [--response-bytes 4000 30000]

A server in a child process answers every call with ``--response-bytes`` bytes (a Lookup's
pooled vectors); the client sends batches of ``--fan-out`` calls at once, one batch after
another, as the frontend fans a micro-batch out to its shard nodes, in three styles:

- ``aio``: grpc.aio, the calls gathered on an event loop (what the frontend does);
- ``future``: a blocking channel's ``.future()`` calls, completed by gRPC's own threads;
- ``threads``: blocking calls on a thread pool of ``--fan-out`` threads.

Prints the client process's CPU (user + system, all threads) per call and the wall time per
batch, each style ``--rounds`` times, interleaved. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

METHOD = "/shardrec.bench.Echo/Call"
STYLES = ("aio", "future", "threads")


def _serve(port_out, response_bytes: int) -> None:
    import grpc

    from services.core.rpc.server import channel_options

    answer = b"r" * response_bytes

    async def handler(_request: bytes, _context) -> bytes:
        return answer

    async def main() -> None:
        server = grpc.aio.server(options=channel_options(64 << 20))
        handlers = {"Call": grpc.unary_unary_rpc_method_handler(handler)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shardrec.bench.Echo", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_style(style: str, address: str, batches: int, fan_out: int, request: bytes) -> tuple[float, float]:
    """(client CPU us per call, wall us per batch) of ``batches`` batches after 50 warm-up ones."""
    from services.core.clients import make_channel

    if style == "aio":

        async def main() -> tuple[float, float]:
            channel = make_channel(address, max_message_bytes=64 << 20)
            call = channel.unary_unary(METHOD)
            try:
                for _ in range(50):
                    await asyncio.gather(*(call(request) for _ in range(fan_out)))
                c0, t0 = _cpu(), time.perf_counter()
                for _ in range(batches):
                    await asyncio.gather(*(call(request) for _ in range(fan_out)))
                return _cpu() - c0, time.perf_counter() - t0
            finally:
                await channel.close()

        cpu, wall = asyncio.run(main())
    else:
        channel = make_channel(address, max_message_bytes=64 << 20, aio=False)
        call = channel.unary_unary(METHOD)
        pool = ThreadPoolExecutor(fan_out)

        def batch() -> None:
            if style == "future":
                futures = [call.future(request) for _ in range(fan_out)]
            else:
                futures = [pool.submit(call, request) for _ in range(fan_out)]
            for f in futures:
                f.result()

        try:
            for _ in range(50):
                batch()
            c0, t0 = _cpu(), time.perf_counter()
            for _ in range(batches):
                batch()
            cpu, wall = _cpu() - c0, time.perf_counter() - t0
        finally:
            pool.shutdown()
            channel.close()
    return cpu / (batches * fan_out) * 1e6, wall / batches * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--fan-out", type=int, default=3)
    p.add_argument("--request-bytes", type=int, default=3000)
    p.add_argument("--response-bytes", type=int, nargs="+", default=[4000, 30000])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    doc: dict[str, dict] = {}
    for size in args.response_bytes:
        receive, send = multiprocessing.Pipe(duplex=False)
        server = multiprocessing.Process(target=_serve, args=(send, size), daemon=True)
        server.start()
        try:
            address = f"127.0.0.1:{receive.recv()}"
            runs: dict[str, list[tuple[float, float]]] = {s: [] for s in STYLES}
            for _ in range(args.rounds):
                for style in STYLES:
                    runs[style].append(run_style(style, address, args.batches, args.fan_out, b"q" * args.request_bytes))
        finally:
            server.terminate()
            server.join()
        doc[str(size)] = {
            s: {"cpu_us_per_call": [round(c) for c, _ in r], "wall_us_per_batch": [round(w) for _, w in r],
                "median_cpu_us_per_call": round(statistics.median(c for c, _ in r))}
            for s, r in runs.items()
        }  # fmt: skip
        for s, r in doc[str(size)].items():
            print(f"response {size:>6} B  {s:<8} client CPU {r['cpu_us_per_call']} us/call, wall {r['wall_us_per_batch']} us/batch")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
