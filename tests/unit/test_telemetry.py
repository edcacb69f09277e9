"""Metrics, traces and logs without a process (docs/observability.md): naming rules, every
registered metric documented and every documented one registered, GetStats read from the
registry under its legacy names, head sampling of linked batch spans, JSON log lines with
request and trace ids, the failure-line rate limit, and ``cluster top``'s arithmetic."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from services.core import metrics as m
from services.core.logs import FailureLog, request_scope, setup_logging
from services.core.telemetry import Telemetry
from services.core.config import ObservabilityConfig
from services.core.tracing import HeadSampler, extract, inject
from services.localcluster import top

DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


def frontend_reading() -> m.FrontendReading:
    return m.FrontendReading(
        admitted=10, shed={"concurrency": 2, "queue_full": 1}, dropped={"batching": 1, "queued": 3}, batches=4, batched_requests=10,
        multi_request_batches=2, largest_batch=5, wire_bytes={"user": 7}, queued=2, in_flight=3, admission_limit=40,
        shed_p99_s=0.0002, live_nodes=3, model_version=2, shard_map_version=1, bags_requested=9, bags_looked_up=8,
        nodes={"shard-0": m.NodeReading(rpcs={"primary": 4, "hedge": 1}, errors={"UNAVAILABLE": 1}, ejections=1, failovers=1)},
        feature_store="lost", feature_store_generation=3, feature_store_failures={"timeout": 2}, feature_store_breaker_open=True,
        feature_store_reloads={"ok": 1}, degraded={"feature_defaults": 4},
    )  # fmt: skip


def shard_reading() -> m.ShardReading:
    return m.ShardReading(partitions={("items", "0of2"): m.PartitionReading(3, 30, 6, 4096)}, versions_ready=(1, 2),
                          serving_version=2, target_version=2, shard_map_version=1, loads=2, refusals=1)  # fmt: skip


def registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    fr, sr = CollectorRegistry(), CollectorRegistry()
    fm = m.FrontendMetrics(fr, frontend_reading)
    fm.request_done("OK", 0.004)
    fm.stage("queue", 0.001)
    fm.batch(3)
    fm.lookup("shard-0", 0.002)
    sm = m.ShardMetrics(sr, shard_reading)
    sm.lookup_done("OK", 0.001)
    sm.pooled(0.0005)
    sm.version_loaded(0.3)
    return fr, sr


def families(registry: CollectorRegistry) -> dict[str, str]:
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in registry.collect()}


def documented() -> set[str]:
    return set(re.findall(r"^\| `(shardrec_[a-z0-9_]+)` \|", DOC.read_text(), re.MULTILINE))


def test_names_follow_the_conventions_and_are_all_documented():
    fr, sr = registries()
    names = {**families(fr), **families(sr)}
    for name, kind in names.items():
        assert name.startswith("shardrec_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram" and "latency" in name or name.endswith("_seconds"):
            assert name.endswith("_seconds"), name
    assert set(names) == documented(), (set(names) ^ documented())


def test_histograms_have_the_slo_buckets():
    fr, _ = registries()
    text = generate_latest(fr).decode()
    les = re.findall(r'shardrec_recommend_latency_seconds_bucket\{code="OK",le="([^"]+)"\}', text)
    assert [float(x) for x in les[:-1]] == list(m.LATENCY_BUCKETS_S) and les[-1] == "+Inf"
    assert 0.05 in m.LATENCY_BUCKETS_S


def test_get_stats_reads_the_registry_under_the_legacy_names():
    fr, _ = registries()
    counters, gauges = m.frontend_stats(fr)
    assert counters["admitted"] == 10 and counters["shed_concurrency"] == 2 and counters["rejected_queue_full"] == 1
    assert counters["dropped_gone"] == 1 and counters["dropped_queued"] == 3 and counters["batches"] == 4
    assert counters["lookup_rpcs"] == 4 and counters["lookup_hedges"] == 1 and counters["node_rpcs_shard-0"] == 5
    assert counters["node_ejections_shard-0"] == 1 and counters["lookup_failovers"] == 1 and counters["wire_bytes_user"] == 7
    assert gauges["queued"] == 2 and gauges["in_flight"] == 3 and gauges["admission_limit"] == 40
    assert gauges["shed_p99_us"] == 200 and gauges["view_live_nodes"] == 3 and gauges["shard_map_version"] == 1
    assert counters["redis_timeouts"] == 2 and counters["feature_syncs"] == 1 and counters["degraded_feature_defaults"] == 4
    assert gauges["feature_store_state"] == 1 and gauges["feature_store_generation"] == 3 and gauges["redis_breaker_open"] == 1
    assert not set(gauges) & set(counters)


def test_metrics_off_records_no_histogram_but_counters_still_read():
    r = CollectorRegistry()
    fm = m.FrontendMetrics(r, frontend_reading, enabled=False)
    fm.request_done("OK", 0.01)
    names = {f.name for f in r.collect()}
    assert m.RECOMMEND_LATENCY not in names and "shardrec_admitted" in names


def _ctx(sampled: bool) -> SpanContext:
    return SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))


def test_a_batch_is_sampled_when_a_request_it_serves_is():
    sampler = HeadSampler(0.0)
    assert sampler.should_sample(None, 99, "batch", links=[Link(_ctx(True))]).decision is Decision.RECORD_AND_SAMPLE
    assert sampler.should_sample(None, 99, "batch", links=[Link(_ctx(False))]).decision is Decision.DROP
    parent = trace.set_span_in_context(trace.NonRecordingSpan(_ctx(True)))
    assert sampler.should_sample(parent, 99, "Lookup").decision is Decision.RECORD_AND_SAMPLE
    assert HeadSampler(1.0).should_sample(None, 99, "Recommend").decision is Decision.RECORD_AND_SAMPLE


def test_traceparent_round_trips_through_metadata():
    span = trace.NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1)))
    key, value = inject(span)
    assert key == "traceparent" and value == f"00-{0xABC:032x}-{0xDEF:016x}-01"
    ctx = extract([("x-request-id", "batch-1"), (key, value)])
    assert trace.get_current_span(ctx).get_span_context().trace_id == 0xABC
    assert extract([("traceparent", "garbage")]) is None and extract(None) is None


def test_json_lines_carry_role_node_request_and_trace_ids():
    out = io.StringIO()
    handler = setup_logging("frontend", "fe-1", fmt="json", stream=out)
    try:
        telemetry = Telemetry(ObservabilityConfig(trace_sample=1.0, trace_file=""), role="frontend", node="fe-1")
        with telemetry.tracing.tracer.start_as_current_span("x"), request_scope("r-1"):
            logging.getLogger("t").warning("hello %s", "there")
        logging.getLogger("t").info("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(ln) for ln in out.getvalue().splitlines())
    assert first["message"] == "hello there" and first["role"] == "frontend" and first["node"] == "fe-1"
    assert first["request_id"] == "r-1" and re.fullmatch(r"[0-9a-f]{32}", first["trace_id"]) and first["level"] == "WARNING"
    assert "request_id" not in second and "trace_id" not in second


def test_failure_lines_are_rate_limited_per_code_and_say_what_was_left_out(caplog):
    now = [0.0]
    log = FailureLog(logging.getLogger("failures"), rate_per_s=1.0, burst=2.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="failures"):
        wrote = [log.failed("RESOURCE_EXHAUSTED", f"Recommend r{i}", "shed") for i in range(10)]
        assert wrote == [True, True] + [False] * 8
        assert log.failed("INTERNAL", "Recommend x", "boom")  # another code has its own budget
        now[0] = 1.0
        assert log.failed("RESOURCE_EXHAUSTED", "Recommend r10", "shed")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0][0] == logging.INFO and lines[2][0] == logging.WARNING
    assert "8 more RESOURCE_EXHAUSTED lines left out" in lines[-1][1]


def test_top_quantiles_and_rates_from_two_scrapes():
    assert top.quantile(0.5, {0.01: 0, 0.02: 10, float("inf"): 10}) == pytest.approx(0.015)
    assert top.quantile(0.99, {0.01: 0.0, float("inf"): 0.0}) is None
    fr, sr = registries()
    before = top.parse(generate_latest(fr).decode())
    fm_reg = CollectorRegistry()
    fm = m.FrontendMetrics(fm_reg, frontend_reading)
    for _ in range(20):
        fm.request_done("OK", 0.004)
    fm.request_done("UNAVAILABLE", 0.3)
    after = top.parse(generate_latest(fm_reg).decode())
    frame = top.frame({"frontend": ("frontend", before, after), "shard-0": ("shard", None, None)}, 2.0)
    row = frame.frontends[0]
    assert row.qps == pytest.approx(10.0) and 3 <= row.p50_ms <= 5 and row.errors == {"UNAVAILABLE": 0.5}
    assert frame.down == ["shard-0"] and frame.nodes[0].node == "shard-0"
