"""The load harness behind ``shardrec bench``: request mix, drivers, meters, results, plots.

Lifecycle of one benchmark (each stage its own module):

1. ``workload.RequestMix``: deterministic requests from the model's power law;
2. ``driver.run_load`` / ``run_recommender``: an ``OpenLoop`` (Poisson arrivals, latency from
   the intended send time) or a ``ClosedLoop`` (N clients) against a ``RecommenderClient`` or
   any ``async def call(request)``; returns ``RunStats`` (HDR histograms, errors by status);
3. ``cpu.CpuMeter`` / ``cpu.CounterMeter``: CPU seconds of every process of the system under
   test and the frontend's counters over the measured window (``meters=[...]``);
4. ``sweep.sweep``: raise the rate until p99 passes the SLO; the saturation point;
5. ``result.BenchResult``: the ``shardrec.bench/v1`` JSON (``validate``, ``write_json``);
6. ``plots``: latency CDF, p99/throughput versus offered rate, bars (import it explicitly:
   it loads matplotlib).

Example (a command line; ``driver.run`` uses a loop with 0.1 ms timers)::

    from benchmarks.harness import *
    mix = RequestMix("demo", candidates=100)
    cpu = CpuMeter({pid: "frontend", ...}); counters = CounterMeter(frontend_addr)
    stats = run(run_recommender(addr, mix, OpenLoop(200, 30, 5), meters=[cpu, counters],
                                progress=lambda p: print(p.line())))
    res = BenchResult(workload=mix.params())
    res.add_run("shardrec", run_record(stats, cpu=cpu, counters_delta=counters.delta))
    res.write_json("bench-results/bench.json")
"""

from benchmarks.harness.cpu import (
    CounterMeter,
    CpuMeter,
    counters_delta,
    read_counters,
    snapshot_counters,
    wire_bytes_per_request,
)
from benchmarks.harness.driver import (
    CallError,
    ClosedLoop,
    OpenLoop,
    Progress,
    RecommenderClient,
    RunStats,
    precise_event_loop,
    run,
    run_load,
    run_recommender,
    status_name,
)
from benchmarks.harness.histogram import LatencyHistogram
from benchmarks.harness.result import (
    SCHEMA,
    BenchResult,
    SchemaError,
    format_table,
    load_json,
    machine_info,
    run_record,
    validate,
    write_json,
)
from benchmarks.harness.sweep import SweepController, SweepPoint, SweepResult, sweep, sweep_async
from benchmarks.harness.workload import MixSizes, RequestMix

__all__ = [
    "SCHEMA",
    "BenchResult",
    "CallError",
    "ClosedLoop",
    "CounterMeter",
    "CpuMeter",
    "LatencyHistogram",
    "MixSizes",
    "OpenLoop",
    "Progress",
    "RecommenderClient",
    "RequestMix",
    "RunStats",
    "SchemaError",
    "SweepController",
    "SweepPoint",
    "SweepResult",
    "counters_delta",
    "format_table",
    "load_json",
    "machine_info",
    "precise_event_loop",
    "read_counters",
    "run",
    "run_load",
    "run_recommender",
    "run_record",
    "snapshot_counters",
    "status_name",
    "sweep",
    "sweep_async",
    "validate",
    "wire_bytes_per_request",
    "write_json",
]
