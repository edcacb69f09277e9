"""The result document (shardrec.bench/v1): records, round trip, validation; and the plots."""

import copy
import json

import numpy as np
import pytest

from benchmarks.harness import plots
from benchmarks.harness.cpu import counters_delta, wire_bytes_per_request
from benchmarks.harness.driver import ClosedLoop, OpenLoop, RunStats
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
from benchmarks.harness.sweep import sweep
from benchmarks.harness.workload import RequestMix


def _stats(load, *, median_ms=2.0, n=500, errors=None, seed=0) -> RunStats:
    rng = np.random.default_rng(seed)
    st = RunStats(load=load.describe(), deadline_s=1.0, duration_s=load.duration_s, warmup_s=load.warmup_s)
    for x in rng.lognormal(np.log(median_ms / 1e3), 0.4, size=n):
        st.histogram.record(x)
        st.service_histogram.record(x * 0.8)
        if load.mode == "open":
            st.send_lag.record(x * 0.1)
    st.errors = dict(errors or {})
    st.ok = n
    st.sent = st.scheduled = st.total_sent = n + sum(st.errors.values())
    st.completed_in_window = n
    if st.errors:
        st.error_samples = {k: f"{k.lower()} happened" for k in st.errors}
    st.started_unix = 1_767_000_000.0
    return st


def _sweep_point(rate: float) -> RunStats:
    # p99 rises past 50 ms from 400 rps on.
    return _stats(OpenLoop(rate, 2.0), median_ms=2.0 if rate < 400 else 80.0, n=int(rate * 2), seed=int(rate))


def _document() -> dict:
    mix = RequestMix("small")
    res = BenchResult(workload=mix.params(), command=["shardrec", "bench", "compare"], notes="test")
    res.system("monolith", description={"lookup": "in-process"})
    res.add_run(
        "monolith",
        run_record(_stats(OpenLoop(100.0, 2.0, 0.5)), label="low load", cpu=0.5, counters_delta=None),
    )
    delta = counters_delta(
        {"requests_batched": 10, "wire_bytes_user": 1000, "wire_bytes_item": 0, "largest_batch": 4},
        {"requests_batched": 210, "wire_bytes_user": 41000, "wire_bytes_item": 160000, "largest_batch": 7},
    )
    res.add_run(
        "shardrec",
        run_record(
            _stats(OpenLoop(100.0, 2.0, 0.5), median_ms=3.0, errors={"UNAVAILABLE": 2}),
            cpu={"seconds": 0.8, "by_process": {"frontend": 0.5, "shard-0": 0.3}, "exited": [], "missing": []},
            counters_delta=delta,
        ),
    )
    res.add_sweep("shardrec", sweep(_sweep_point, 100.0, factor=2.0))
    res.add_run("closed", _stats(ClosedLoop(8, 1.0)))
    return res.to_dict()


def test_run_record_per_request_figures():
    doc = _document()
    mono, shard = doc["systems"][0]["runs"][0], doc["systems"][1]["runs"][0]
    # No counters: per request = client completions in the window.
    assert mono["requests_in_window_source"] == "client" and mono["requests_in_window"] == 500
    assert mono["cpu_seconds_per_request"] == pytest.approx(0.5 / 500)
    assert mono["wire_bytes_per_request"] is None and mono["label"] == "low load"
    # Counters: the frontend's own request count (200 in the window) is the denominator.
    assert shard["requests_in_window_source"] == "frontend" and shard["requests_in_window"] == 200
    assert shard["cpu_seconds_per_request"] == pytest.approx(0.8 / 200)
    assert shard["wire_bytes_per_request"] == {"user": 200.0, "item": 800.0, "total": 1000.0}
    assert shard["counters_delta"]["largest_batch"] == 7
    assert shard["errors"] == {"UNAVAILABLE": 2} and shard["error_share"] == pytest.approx(2 / 502)
    assert LatencyHistogram.decode(shard["histogram"]).summary() == shard["latency_ms"]


def test_round_trip_and_sweep_references():
    doc = _document()
    assert doc["schema"] == SCHEMA and doc["machine"]["cpu_count"] >= 1
    shard = doc["systems"][1]
    sw = shard["sweep"]
    # 100 and 200 pass, 400 fails; the refine point sqrt(200 * 400) = 283 passes: the saturation.
    assert [p["ok"] for p in sw["points"]] == [True, True, False, True]
    assert sw["saturation_rps"] == sw["points"][-1]["offered_rps"] == pytest.approx(282.84, abs=0.01)
    assert sw["saturation_throughput_rps"] == pytest.approx(sw["saturation_rps"], abs=1)
    for p in sw["points"]:
        assert shard["runs"][p["run_index"]]["offered_rps"] == p["offered_rps"]


def test_write_and_load_json(tmp_path):
    doc = _document()
    path = write_json(doc, tmp_path / "out" / "bench.json")
    assert load_json(path) == json.loads(json.dumps(doc))
    text = format_table(doc)
    for name in ("monolith", "shardrec", "closed", "saturation"):
        assert name in text


def _break(path, value):
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_break(["schema"], "shardrec.bench/v0"), "schema"),
        (_break(["systems"], []), "at least one system"),
        (_break(["systems", 0, "runs", 0, "latency_ms"], KeyError), "latency_ms: missing"),
        (_break(["systems", 0, "runs", 0, "latency_ms", "p99_ms"], "fast"), "p99_ms"),
        (_break(["systems", 0, "runs", 0, "latency_ms", "p50_ms"], 1e9), "must not decrease"),
        (_break(["systems", 0, "runs", 0, "ok"], 10**6), "more successful calls than sent"),
        (_break(["systems", 0, "runs", 0, "histogram"], "HISTFAAAgarbage"), "histogram"),
        (_break(["systems", 0, "runs", 0, "mode"], "sideways"), "mode"),
        (_break(["systems", 0, "runs", 0, "error_share"], 1.5), "error_share"),
        (_break(["systems", 0, "runs", 0, "errors"], {"UNAVAILABLE": -1}), "errors"),
        (_break(["systems", 1, "name"], "monolith"), "used once"),
        (_break(["systems", 1, "sweep", "saturation_rps"], 400.0), "highest rate that met the SLO"),
        (_break(["systems", 1, "sweep", "points", 0, "run_index"], 99), "no such run"),
        (_break(["systems", 2, "runs", 0, "concurrency"], 0), "concurrency"),
    ],
)
def test_validate_rejects_broken_documents(mutate, message):
    doc = _document()
    validate(doc)
    broken = copy.deepcopy(doc)
    mutate(broken)
    with pytest.raises(SchemaError, match=message):
        validate(broken)


def test_histogram_must_match_its_summary():
    doc = _document()
    other = LatencyHistogram()
    other.record(0.001)
    doc["systems"][0]["runs"][0]["histogram"] = other.encode()
    with pytest.raises(SchemaError, match="holds 1 values"):
        validate(doc)


def test_counters_helpers_and_machine_info():
    assert counters_delta({"a": 5, "largest_batch": 9}, {"a": 7, "b": 3, "largest_batch": 2}) == {
        "a": 2,
        "b": 3,
        "largest_batch": 2,
    }
    assert wire_bytes_per_request({"wire_bytes_user": 10}) is None  # no denominator
    assert wire_bytes_per_request({"wire_bytes_user": 10}, requests=5) == {"user": 2.0, "item": 0.0, "total": 2.0}
    assert wire_bytes_per_request({"requests_batched": 4}) is None  # no byte counters
    m = machine_info()
    assert m["cpu_count"] >= 1 and m["python"] and m["hostname"] and "cpu_model" in m and "torch" in m


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_pngs(tmp_path):
    doc = _document()
    assert _is_png(plots.latency_cdf(doc, tmp_path / "cdf.png"))
    assert _is_png(plots.latency_cdf([doc, doc], tmp_path / "cdf_all.png", all_runs=True, service_time=True))
    h = LatencyHistogram()
    h.record_many([0.001, 0.002, 0.004])
    assert _is_png(plots.latency_cdf({"a": h, "b": h.encode()}, tmp_path / "cdf_map.png"))
    assert _is_png(plots.sweep_plot(doc, tmp_path / "sweep.png"))
    assert _is_png(plots.bar_table(doc, tmp_path / "bars.png"))
    reps = plots.representative_runs(doc["systems"][1])
    assert len(reps) == 1 and "saturation" in reps[0][0]
    assert reps[0][1]["offered_rps"] == doc["systems"][1]["sweep"]["saturation_rps"]
