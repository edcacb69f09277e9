"""The phased open loop (``benchmarks.harness.phased``): schedule, records and the overload
figures read off them, on an in-process target with known behaviour."""

import asyncio

import grpc
import pytest

from benchmarks.harness.driver import CallError
from benchmarks.harness.phased import Phase, Records, drive_phases, phase_summary, recovery_s, window_p99_ms


def test_phases_run_back_to_back_and_sheds_are_counted_apart():
    sent_in_burst = []

    async def call(i: int) -> None:
        if i % 3 == 0:
            raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed")
        await asyncio.sleep(0.001)

    phases = [Phase("base", 1.0, 0.5), Phase("burst", 3.0, 0.5)]
    rec = asyncio.run(drive_phases(call, lambda i: i, phases, 200.0, deadline_s=1.0, seed=1,
                                   at=[(0.5, lambda: sent_in_burst.append(True))]))
    assert sent_in_burst == [True]
    summary = phase_summary(rec)
    base, burst = summary
    assert 60 <= base["offered_rps"] * 0.5 <= 140  # ~100 Poisson arrivals in 0.5 s
    assert burst["offered_rps"] > 2 * base["offered_rps"]
    for s in summary:
        total = s["ok"] + s["shed"] + sum(s["errors"].values())
        assert s["shed"] == pytest.approx(total / 3, abs=0.1 * total)
        assert s["shed_latency_ms"]["p99"] < 250 and s["admitted_latency_ms"]["p50"] >= 1.0  # generous: noisy cores
    assert rec.samples["RESOURCE_EXHAUSTED"] == "shed"


def synthetic(latencies_by_phase: list[list[float]], window_s: float = 0.25) -> Records:
    phases = tuple(Phase(f"p{i}", 1.0, 1.0) for i in range(len(latencies_by_phase)))
    rec = Records(phases, 100.0, 1.0)
    for pi, lats in enumerate(latencies_by_phase):
        for k, lat in enumerate(lats):
            t = pi + k / len(lats)
            rec.intended.append(t), rec.sent.append(t), rec.done.append(t + lat), rec.status.append("OK"), rec.phase.append(pi)
    return rec


def test_recovery_is_the_start_of_the_last_run_of_good_windows():
    base = [0.010] * 40
    after = [0.100] * 10 + [0.011] * 10 + [0.050] * 5 + [0.011] * 15  # bad, good, bad, good
    rec = synthetic([base, after])
    windows = window_p99_ms(rec, 1)
    assert [w for w, _ in windows] == [0.0, 0.25, 0.5, 0.75]
    assert recovery_s(rec, 0, 1) == pytest.approx(0.75)
    assert recovery_s(synthetic([base, [0.2] * 40]), 0, 1) is None
