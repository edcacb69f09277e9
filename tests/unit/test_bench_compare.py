"""Pure parts of `bench compare`: medians over interleaved runs, the frontend-host CPU target,
--pin's CPU sets."""

import os

import pytest

from benchmarks.compare import median_targets, target_rows
from benchmarks.pinning import cpu_list, parse_cpus, parse_pin, pin_processes


def _doc(gap_ms: float, front_ms: float, mono_front_ms: float) -> dict:
    def run(label, p50, cpu, front):
        return {"label": label, "latency_ms": {"p50_ms": p50, "p99_ms": p50 * 2}, "cpu_seconds_per_request": cpu,
                "frontend_cpu_seconds_per_request": front, "wire_bytes_per_request": None}  # fmt: skip

    return {"systems": [
        {"name": "monolith", "runs": [run("low-load", 5.0, None, None), run("cpu", 5, 0.004, mono_front_ms / 1e3)], "sweep": None},
        {"name": "shardrec", "runs": [run("low-load", 5.0 + gap_ms, None, None), run("cpu", 6, 0.006, front_ms / 1e3)], "sweep": None},
    ]}  # fmt: skip


def test_frontend_host_cpu_is_a_target_apart_from_the_total():
    rows = {r["target"]: r for r in target_rows(_doc(1.0, 4.4, 4.0))}
    host = rows["frontend-host CPU per Recommend vs monolith"]
    assert host["value"] == pytest.approx(1.1) and host["met"] is True
    assert rows["CPU per Recommend vs monolith (all processes)"]["value"] == pytest.approx(1.5)


def test_targets_are_the_medians_of_the_runs_with_every_run_kept():
    per_run = [target_rows(_doc(gap, 4.0, 4.0)) for gap in (3.0, 1.0, 2.5)]
    rows = {r["target"]: r for r in median_targets(per_run)}
    p50 = rows["latency gap to monolith at low load, p50"]
    assert p50["value"] == 2.5 and p50["met"] is False and p50["per_run"] == [3.0, 1.0, 2.5]
    assert p50["measured"] == "median +2.50 ms of 3"


def test_pin_sets():
    assert parse_pin("auto", [0, 1, 2, 3]) == ({0, 1}, {2, 3})
    assert parse_pin("0:1-3", [0, 1, 2, 3]) == ({0}, {1, 2, 3})
    assert parse_cpus("0-2,5") == {0, 1, 2, 5} and cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for bad, match in (("0-1:1", "overlap"), ("0:9", "not available"), ("01", "FRONTEND_CPUS"), ("a:1", "not a CPU list")):
        with pytest.raises(ValueError, match=match):
            parse_pin(bad, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        parse_pin("auto", [0])


def test_pinning_a_process_pins_all_its_threads():
    import threading

    mine = frozenset(os.sched_getaffinity(0))
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    one = frozenset({min(mine)})
    try:
        assert pin_processes({os.getpid(): "me"}, one) == ["me"]
        assert os.sched_getaffinity(t.native_id) == one, "a thread started before pinning was not pinned"
    finally:
        pin_processes({os.getpid(): "me"}, mine)
        stop.set()
        t.join()
    assert os.sched_getaffinity(0) == mine
