"""The load drivers, the request mix, the meters and the sweep's control logic.

The drivers run against a real grpc.aio Recommender started here on a loopback port (its
handler answers at once, sleeps, stalls its event loop or aborts on purpose) or against a plain
``async def call(request)``. A handler that sleeps is the thing under test; no test waits by
sleeping.
"""

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from benchmarks.harness import cpu as cpu_mod
from benchmarks.harness.cpu import CounterMeter, CpuMeter
from benchmarks.harness.driver import (
    CallError,
    ClosedLoop,
    OpenLoop,
    RecommenderClient,
    run,
    run_load,
    run_recommender,
    status_name,
)
from benchmarks.harness.sweep import SweepController, sweep, sweep_async
from benchmarks.harness.workload import MixSizes, RequestMix
from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.synth import PRESETS, model_spec


def _req(i: int) -> recommend_pb2.RecommendRequest:
    return recommend_pb2.RecommendRequest(request_id=str(i), user_id=i, candidate_item_ids=[1, 2, 3], top_k=1)


class _Recommender(recommend_pb2_grpc.RecommenderServicer, recommend_pb2_grpc.FrontendAdminServicer):
    """A real Recommender whose behaviour per request is the test's ``handle(request, context)``."""

    def __init__(self, handle):
        self.handle = handle
        self.calls = 0

    async def Recommend(self, request, context):
        self.calls += 1
        await self.handle(request, context)
        return recommend_pb2.RecommendResponse(request_id=request.request_id, version=1)

    async def GetStats(self, request, context):
        return recommend_pb2.GetStatsResponse(
            counters={"requests_batched": self.calls, "wire_bytes_user": 100 * self.calls, "largest_batch": 3}
        )


@contextlib.asynccontextmanager
async def _serve(handle):
    servicer = _Recommender(handle)
    server = grpc.aio.server()
    recommend_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    recommend_pb2_grpc.add_FrontendAdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def _fast(request, context):
    return None


# -- open loop -----------------------------------------------------------------------------


def test_open_loop_achieves_the_offered_rate_over_real_grpc():
    rate, duration = 300.0, 1.0

    async def main():
        async with _serve(_fast) as (addr, servicer):
            mix = RequestMix("small", candidates=20)
            poisson = await run_recommender(addr, mix, OpenLoop(rate, duration, warmup_s=0.2, seed=7), channels=2)
            uniform = await run_recommender(addr, _req, OpenLoop(200.0, 0.5, arrivals="uniform"))
            return poisson, uniform, servicer.calls

    st, uni, calls = run(main())
    # The Poisson schedule offers rate * duration +- a few sqrt; all of it is sent and served.
    assert abs(st.scheduled - rate * duration) < 4 * np.sqrt(rate * duration)
    assert st.sent == st.ok == st.scheduled and st.errors == {} and st.client_overloaded == 0
    assert st.throughput_rps == pytest.approx(st.scheduled / duration, rel=0.1)
    assert st.histogram.count == st.ok and st.service_histogram.count == st.ok and st.send_lag.count == st.sent
    assert st.total_sent > st.sent  # the warm-up ran but is not in the statistics
    assert st.offered_rps == rate and st.mode == "open" and st.error_share == 0.0
    assert uni.scheduled in (100, 101)  # evenly spaced: exactly rate * duration
    assert calls == st.total_sent + uni.total_sent


def test_open_loop_latency_counts_queueing_behind_a_stall_coordinated_omission():
    """The server shares the client's event loop and stalls it for 200 ms once (a GC pause):
    requests scheduled during the stall leave late. Measured from their intended send time
    they show the wait; measured from the actual send (the naive way) they look fast."""
    stall_at, stall_s, rate = 150, 0.2, 300.0

    async def handle(request, context):
        if request.request_id == str(stall_at):
            time.sleep(stall_s)  # blocks the whole loop: client and server stop together

    async def main():
        async with _serve(handle) as (addr, _):
            return await run_recommender(addr, _req, OpenLoop(rate, 1.2, arrivals="uniform"), deadline_s=2.0)

    st = asyncio.run(main())
    assert st.errors == {}
    in_stall = int(stall_s * rate)  # ~60 requests were due while the loop was stalled
    # Corrected: the queueing shows; those due in the first half of the stall waited >= 100 ms.
    assert st.histogram.max_ms() >= 0.95 * stall_s * 1e3
    assert st.histogram.count_above_ms(100) >= in_stall // 2 - 10
    assert st.histogram.percentile_ms(95) >= 50
    assert st.send_lag.max_ms() >= 150
    # Naive (from the actual send): only the call caught in flight saw the stall (on a busy
    # machine a few others may be slow on their own: far fewer than the corrected count).
    assert st.service_histogram.count_above_ms(100) <= max(3, st.histogram.count_above_ms(100) // 4)
    assert st.service_histogram.percentile_ms(95) < 50


def test_open_loop_counts_client_overload_when_in_flight_is_bounded():
    async def call(request):
        await asyncio.sleep(0.05)

    st = asyncio.run(run_load(call, _req, OpenLoop(400.0, 0.3, arrivals="uniform", max_in_flight=5)))
    assert st.client_overloaded > 0
    assert st.sent + st.client_overloaded == st.scheduled
    assert st.error_share == pytest.approx(st.client_overloaded / st.scheduled)
    assert st.errors_with_overload()["CLIENT_OVERLOADED"] == st.client_overloaded


# -- closed loop, errors, warm-up, progress, meters ------------------------------------------


def test_closed_loop_never_exceeds_its_concurrency_and_reports_progress():
    active = peak = 0
    seen: list[str] = []
    lines = []

    async def call(request):
        nonlocal active, peak
        seen.append(request.request_id)
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.002)
        active -= 1

    st = asyncio.run(
        run_load(call, _req, ClosedLoop(4, 0.4), progress=lines.append, progress_interval_s=0.1)
    )
    assert peak == 4
    assert st.sent == st.ok == st.histogram.count == len(seen) == st.total_sent
    assert len(set(seen)) == len(seen)  # each request index used once
    assert st.concurrency == 4 and st.mode == "closed" and st.offered_rps is None
    assert st.throughput_rps > 0 and st.send_lag.count == 0
    assert len(lines) >= 3 and lines[-1].phase == "done" and lines[-1].done == st.total_sent
    assert "rps" in lines[0].line() and "p99" in lines[0].line()


def test_errors_are_counted_by_grpc_status_with_a_sample_message():
    async def handle(request, context):
        kind = request.user_id % 5
        if kind == 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad user {request.user_id}")
        elif kind == 2:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        elif kind == 3:
            await asyncio.sleep(2.0)  # past the 0.1 s deadline

    sent: list[int] = []

    async def main():
        async with _serve(handle) as (addr, _):
            async with RecommenderClient(addr, deadline_s=0.1) as client:

                async def call(request):
                    sent.append(request.user_id)
                    await client(request)

                return await run_load(call, _req, ClosedLoop(8, 0.5), deadline_s=0.1)

    st = asyncio.run(main())
    kinds = np.array(sent) % 5
    expected = {
        "INVALID_ARGUMENT": int((kinds == 1).sum()),
        "RESOURCE_EXHAUSTED": int((kinds == 2).sum()),
        "DEADLINE_EXCEEDED": int((kinds == 3).sum()),
    }
    assert st.errors == expected
    assert st.ok == int(np.isin(kinds, [0, 4]).sum())
    assert st.error_share == pytest.approx(sum(expected.values()) / len(sent))
    assert st.error_samples["INVALID_ARGUMENT"].startswith("bad user")
    assert st.error_samples["RESOURCE_EXHAUSTED"] == "queue full"
    assert st.histogram.max_ms() < 100  # failures are not in the latency histogram


def test_plain_callables_fail_with_call_error_timeouts_and_client_errors():
    async def call(request):
        i = int(request.request_id)
        if i % 4 == 1:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "no replica")
        if i % 4 == 2:
            raise KeyError("oops")
        if i % 4 == 3:
            await asyncio.Event().wait()  # never answers: the driver's deadline ends it

    st = asyncio.run(run_load(call, _req, ClosedLoop(4, 0.2), deadline_s=0.02))
    assert set(st.errors) == {"UNAVAILABLE", "CLIENT_ERROR", "DEADLINE_EXCEEDED"}
    assert st.error_samples["UNAVAILABLE"] == "no replica"
    assert st.error_samples["CLIENT_ERROR"].startswith("KeyError")
    assert status_name(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert status_name(ValueError()) == "CLIENT_ERROR"


class _RecordingMeter:
    def __init__(self, clock):
        self.clock = clock
        self.started = self.stopped = None
        self.ticks = 0

    async def start(self):
        self.started = self.clock()

    def stop(self):
        self.stopped = self.clock()

    def tick(self):
        self.ticks += 1


def test_warmup_is_excluded_and_meters_cover_the_measured_window():
    warmup, duration = 0.3, 0.3
    t0 = time.perf_counter()

    async def call(request):
        # Slow during the warm-up (by the test's clock, which started first), fast after.
        await asyncio.sleep(0.05 if time.perf_counter() < t0 + warmup else 0.001)

    meter = _RecordingMeter(time.perf_counter)
    st = asyncio.run(
        run_load(call, _req, ClosedLoop(2, duration, warmup_s=warmup), meters=[meter], progress_interval_s=0.1)
    )
    assert st.ok > 0 and st.total_sent > st.sent
    assert st.histogram.max_ms() < 45  # no warm-up call (>= 50 ms) is in the statistics
    assert meter.started - t0 == pytest.approx(warmup, abs=0.05)
    assert meter.stopped - meter.started == pytest.approx(duration, abs=0.05)
    assert meter.ticks >= 1


def test_counter_meter_reads_frontend_admin_at_the_window_edges():
    async def main():
        async with _serve(_fast) as (addr, servicer):
            counters = CounterMeter(addr)
            st = await run_recommender(addr, _req, OpenLoop(200.0, 0.3, warmup_s=0.1, arrivals="uniform"), meters=[counters])
            return st, counters

    st, counters = asyncio.run(main())
    d = counters.delta
    assert d["largest_batch"] == 3  # a gauge keeps its value
    assert abs(d["requests_batched"] - st.sent) <= 2  # calls inside the window, give or take the edges
    assert d["wire_bytes_user"] == 100 * d["requests_batched"]
    assert cpu_mod.wire_bytes_per_request(d) == {"user": 100.0, "item": 0.0, "total": 100.0}


def test_cpu_meter_sums_processes_and_tolerates_exits():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys,time\nt=time.process_time()\nwhile time.process_time()-t<0.1: pass\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        meter = CpuMeter({os.getpid(): "self", child.pid: "child", 2**22 + 12345: "ghost"})
        meter.start()
        t = time.process_time()
        while time.process_time() - t < 0.05:  # burn CPU in this process
            pass
        child.stdin.close()  # the child finishes its busy loop, reads EOF and exits
        child.wait(timeout=10)
        meter.stop()
    finally:
        child.kill()
        child.wait()
    by = meter.by_process
    assert by["self"] >= 0.04
    assert by["child"] >= 0.0 and by["ghost"] == 0.0
    assert meter.missing == ["ghost"]
    assert meter.exited == ["child"]
    assert meter.seconds == pytest.approx(sum(by.values()))


# -- the request mix -----------------------------------------------------------------------


def test_request_mix_is_deterministic_and_follows_the_preset():
    p = PRESETS["demo"]
    mix = RequestMix("demo", seed=3, history_override_share=0.2)
    reqs = [mix.request(i) for i in range(2000)]
    again = RequestMix("demo", seed=3, history_override_share=0.2)
    assert [again.request(i) for i in (1999, 0, 777)] == [reqs[1999], reqs[0], reqs[777]]  # any order
    assert RequestMix("demo", seed=4).request(5) != reqs[5]
    cold = np.array([mix.is_cold(i) for i in range(2000)])
    users = np.array([r.user_id for r in reqs])
    assert (users[~cold] < p.users_with_features).all() and (users[cold] >= p.users_with_features).all()
    assert 0.02 < cold.mean() < 0.09
    assert np.median(users[~cold]) < p.users_with_features / 100  # power law: hot ids are low
    for r in reqs[:200]:
        c = list(r.candidate_item_ids)
        assert len(c) == 100 and len(set(c)) == 100 and max(c) < p.items_with_features and r.top_k == 10
    hist = [len(r.sparse_features["user_history"].values) for r in reqs if r.sparse_features]
    assert 0.15 < len(hist) / len(reqs) < 0.25 and 1 <= min(hist) and max(hist) <= 50
    assert [r.request_id for r in reqs[:2]] == ["b3-0", "b3-1"]


def test_request_mix_ranges_of_candidates_and_model_specs():
    mix = RequestMix("small", candidates=(5, 12), top_k=10)
    counts = [len(mix.request(i).candidate_item_ids) for i in range(300)]
    assert min(counts) == 5 and max(counts) == 12
    assert all(mix.request(i).top_k == min(10, c) for i, c in enumerate(counts[:50]))
    sizes = MixSizes.of(model_spec("small"))
    assert sizes.items == 5000 and sizes.history_feature == "user_history" and sizes.cold_users == (2000, 4000)
    assert len(RequestMix(sizes, candidates=1000).request(0).candidate_item_ids) == 1000
    with pytest.raises(ValueError):
        RequestMix("small", candidates=5001)
    with pytest.raises(ValueError):
        RequestMix("nope")
    assert RequestMix("small").params()["candidates"] == 100


# -- sweep control -------------------------------------------------------------------------


class _Point:
    """What a run at ``rate`` would measure on a server of ``capacity`` rps (an M/M/1-like knee)."""

    def __init__(self, rate, capacity=1000.0, error_from=None):
        self.p99_ms = 5.0 + 1000.0 / (capacity - rate) if rate < capacity else 10_000.0
        self.error_share = 0.05 if error_from is not None and rate >= error_from else 0.0
        self.throughput_rps = min(rate, capacity)


def test_sweep_finds_the_knee_and_refines_once():
    rates = []

    def run_at(rate):
        rates.append(rate)
        return _Point(rate)

    res = sweep(run_at, 100.0, slo_p99_ms=50.0, factor=1.5)
    # 100, 150, 225, 337.5, 506, 759 pass; 1139 fails; refined once at sqrt(759 * 1139) = 930.
    assert [round(r) for r in rates] == [100, 150, 225, 338, 506, 759, 1139, 930]
    assert res.saturation_rps == pytest.approx(930.1, abs=0.5)
    assert res.saturation.throughput_rps == res.saturation_rps
    assert [p.ok for p in res.points] == [True] * 6 + [False, True]
    assert res.points[-1].refine and "p99" in res.stop_reason
    d = res.to_dict()
    assert d["saturation_rps"] == res.saturation_rps and len(d["points"]) == 8


def test_sweep_stops_on_errors_first_failure_and_max_steps():
    res = sweep(lambda r: _Point(r, error_from=300), 100.0, refine=False)
    assert res.saturation_rps == 225.0 and "error share" in res.stop_reason
    res = sweep(lambda r: _Point(r, capacity=50), 100.0)
    assert res.saturation_rps is None and len(res.points) == 1 and "start lower" in res.stop_reason
    res = sweep(lambda r: _Point(r, capacity=1e9), 10.0, max_steps=3)
    assert len(res.points) == 3 and res.saturation_rps == pytest.approx(22.5) and "max_steps" in res.stop_reason
    record = {"latency_ms": {"p99_ms": 12.0}, "error_share": 0.0, "throughput_rps": 99.0}
    res = sweep(lambda r: record if r < 200 else {**record, "error_share": 0.5}, 100.0, refine=False)
    assert res.saturation_rps == 150.0 and res.saturation.throughput_rps == 99.0
    c = SweepController(100.0)
    with pytest.raises(ValueError):
        c.observe(123.0, _Point(123.0))


def test_sweep_async_matches_sweep():
    async def run_at(rate):
        return _Point(rate)

    a = asyncio.run(sweep_async(run_at, 100.0))
    b = sweep(_Point, 100.0)
    assert [p.rate_rps for p in a.points] == [p.rate_rps for p in b.points]
    assert a.saturation_rps == b.saturation_rps


def test_a_failing_meter_ends_the_run_at_once():
    class Broken:
        def start(self):
            raise RuntimeError("meter broke")

        def stop(self):
            pass

    async def call(request):
        await asyncio.sleep(0.001)

    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="meter broke"):
        asyncio.run(run_load(call, _req, ClosedLoop(2, 30.0), meters=[Broken()]))
    assert time.perf_counter() - t < 5.0  # not after the 30 s window


def test_recommender_client_sends_its_token():
    seen: list[str | None] = []

    async def handle(request, context):
        seen.append(dict(context.invocation_metadata()).get("authorization"))

    tokens = iter(["first", "second"])

    async def main():
        async with _serve(handle) as (addr, _):
            async with RecommenderClient(addr, deadline_s=1.0, token="fixed") as client:
                await client(_req(0))
            async with RecommenderClient(addr, deadline_s=1.0, token=lambda: next(tokens)) as client:
                await client(_req(1))
                await client(_req(2))
            async with RecommenderClient(addr, deadline_s=1.0) as client:
                await client(_req(3))

    asyncio.run(main())
    assert seen == ["Bearer fixed", "Bearer first", "Bearer second", None]
