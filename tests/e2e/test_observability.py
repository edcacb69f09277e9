"""Observability on a live local cluster started as ``shardrec cluster up --prometheus`` does it
(docs/observability.md): a real Prometheus scraping every process every second, its HTTP API
agreeing with what a client measured; one Recommend's trace across the frontend and every
shard it called; every documented metric moving under the traffic or the fault that moves it;
the metrics of the alert rules and the dashboard in a real scrape; ids in logs and errors.

One cluster for the module (ZooKeeper, Redis, Prometheus, three shards, a frontend; every
shard and frontend traces to one span file and logs JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core import metrics as m
from services.localcluster.config import DEFAULT_SPEC, LocalClusterConfig, resolve_spec
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.state import ROLE_FRONTEND, ROLE_SHARD
from services.localcluster.top import Samples, scrape
from tests.e2e.test_recommend import random_requests
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "observability.md"
SCRAPE_S = 1.0


@dataclass
class Obs:
    cluster: LocalCluster
    spans: Path
    prometheus: str
    requests: list = field(default_factory=list)

    @property
    def frontend(self) -> str:
        return self.cluster.state.frontend

    def metrics_of(self, role: str) -> dict[str, str]:
        return {p.name: p.metrics for p in self.cluster.state.processes if p.role == role and p.metrics}


@pytest.fixture(scope="module")
def obs(tmp_path_factory) -> Obs:
    workdir = tmp_path_factory.mktemp("observability")
    spans = workdir / "spans.jsonl"
    config = LocalClusterConfig(
        workdir=workdir, spec=resolve_spec(DEFAULT_SPEC), preset="small", nodes=3, start_timeout_s=120.0, stop_grace_s=5.0,
        prometheus=True, scrape_interval_s=SCRAPE_S,
        service_args=("--trace-sample", "0.02", "--trace-file", str(spans), "--log-format", "json"),
    )  # fmt: skip
    cluster = LocalCluster(config, io.StringIO(), SignalGuard(), mode="up")
    try:
        cluster.start()
        yield Obs(cluster, spans, cluster.state.prometheus, random_requests(64, seed=13))
    finally:
        cluster.stop()


def call(address: str, req, timeout_s: float = 5.0, metadata=None):
    with grpc.insecure_channel(address) as ch:
        return recommend_pb2_grpc.RecommenderStub(ch).Recommend(req, timeout=timeout_s, metadata=metadata)


async def open_loop(address: str, requests, rate: float, duration_s: float) -> list[tuple[float, float, str]]:
    """(sent at, latency s, status code name) of each call, sent at ``rate`` a second for
    ``duration_s``."""
    out: list[tuple[float, float, str]] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)

        async def one(req) -> None:
            t0 = time.time()
            try:
                await stub.Recommend(req, timeout=5.0)
                out.append((t0, time.time() - t0, "OK"))
            except grpc.RpcError as e:
                out.append((t0, time.time() - t0, e.code().name))

        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task] = []
        n, start = int(rate * duration_s), loop.time()
        all_sent = loop.create_future()

        def send(i: int) -> None:  # the arrival schedule: call i at start + i / rate
            tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
            if i == n - 1:
                all_sent.set_result(None)

        for i in range(n):
            loop.call_at(start + i / rate, send, i)
        await all_sent
        await asyncio.gather(*tasks)
    return out


def promql(base: str, query: str, at: float) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def value(result: list[dict], **labels: str) -> float:
    got = [float(r["value"][1]) for r in result if all(r["metric"].get(k) == v for k, v in labels.items())]
    assert got, (labels, result)
    return sum(got)


def bucket_of(seconds: float) -> int:
    """Index of the latency bucket ``seconds`` falls in (the last: +Inf)."""
    return next((i for i, le in enumerate(m.LATENCY_BUCKETS_S) if seconds <= le), len(m.LATENCY_BUCKETS_S))


def scraped_after(obs: Obs, t: float) -> bool:
    """Has Prometheus samples of the frontend and of every shard taken after ``t`` (unix s)?"""
    query = f'timestamp({m.RECOMMEND_LATENCY}_count{{process="frontend"}}) or timestamp({m.SHARD_LOOKUP_LATENCY}_count)'
    got = promql(obs.prometheus, query, time.time())
    return len({r["metric"].get("process") for r in got}) == 1 + len(obs.metrics_of(ROLE_SHARD)) and min(float(r["value"][1]) for r in got) > t


def quantile_bucket(counts: dict[float, float], q: float) -> int:
    """Index of the bucket the ``q`` quantile falls in, from cumulative ``{le: count}``."""
    les = sorted(counts)
    return next(i for i, le in enumerate(les) if counts[le] >= q * counts[les[-1]])


def test_prometheus_agrees_with_the_client(obs: Obs):
    """Read from the Prometheus HTTP API at a scrape before and one after the timed calls (a
    warm-up first): the frontend's request rate is within 10% of the client's, its p95 within
    one bucket of the client's and its p99 not above the client's, and every shard's Lookup
    rate within 10% of the frontend's count of Lookups sent to it."""
    rate, duration = 25.0, 12.0
    asyncio.run(open_loop(obs.frontend, obs.requests, 2.0, 2.5))  # warm-up: not in the comparison
    warm = time.time()
    wait_for(lambda: scraped_after(obs, warm), 20, "a scrape after the warm-up", interval_s=0.2)
    before = time.time()
    sent = asyncio.run(open_loop(obs.frontend, obs.requests, rate, duration))
    codes = [c for _, _, c in sent]
    assert codes.count("OK") >= 0.95 * len(sent), {c: codes.count(c) for c in set(codes)}
    done = max(s + lat for s, lat, _ in sent)
    wait_for(lambda: scraped_after(obs, done), 20, "a scrape after the traffic", interval_s=0.2)
    after = time.time()

    def delta(query: str, label: str | None = None) -> dict:
        """``query`` at ``after`` minus at ``before`` (the last samples before each), by ``label``;
        and the seconds between those samples."""
        a, b = promql(obs.prometheus, query, before), promql(obs.prometheus, query, after)
        key = (lambda r: r["metric"].get(label, "")) if label else (lambda r: "")
        first = {key(r): float(r["value"][1]) for r in a}
        return {key(r): float(r["value"][1]) - first.get(key(r), 0.0) for r in b}

    seconds = delta(f'max(timestamp({m.RECOMMEND_LATENCY}_count{{process="frontend"}}))')[""]
    served = delta(f'sum({m.RECOMMEND_LATENCY}_count{{process="frontend"}})')[""]
    client_rate = len(sent) / seconds  # every timed call was sent and answered between the two samples
    assert abs(served / seconds - client_rate) <= 0.1 * client_rate, (served / seconds, client_rate)

    counts = {float(le): n for le, n in delta(f'sum by (le) ({m.RECOMMEND_LATENCY}_bucket{{process="frontend"}})', "le").items()}
    # The server sees less than the client (never the client's own stalls: 3 calls of 300 held
    # 15 ms by the client's loop move its p99 two buckets), so: the p95 within one bucket of the
    # client's, and neither quantile above the client's.
    lat = [lat for _, lat, _ in sent]
    client_p95, client_p99 = (float(np.quantile(lat, q)) for q in (0.95, 0.99))
    assert bucket_of(client_p95) - 1 <= quantile_bucket(counts, 0.95) <= bucket_of(client_p95), (sorted(counts.items()), client_p95)
    assert quantile_bucket(counts, 0.99) <= bucket_of(client_p99), (sorted(counts.items()), client_p99)

    handled = delta(f"sum by (process) ({m.SHARD_LOOKUP_LATENCY}_count)", "process")
    sent_to = delta(f'sum by (node) ({m.LOOKUP_RPCS}_total{{process="frontend"}})', "node")
    for node in obs.metrics_of(ROLE_SHARD):
        want = sent_to[node]
        assert want > 0 and abs(handled[node] - want) <= 0.1 * want, (node, handled[node], want)


def test_one_recommend_traced_across_the_frontend_and_every_shard(obs: Obs):
    """A caller's sampled traceparent: its Recommend span is a child of the caller's span, the
    batch span links to it, and the batch's Lookup spans (in the batch's own trace: the
    caller's trace id never reaches a shard) are the parents of the shards' server spans."""
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    req = recommend_pb2.RecommendRequest()
    req.CopyFrom(obs.requests[0])
    req.request_id = "traced-" + uuid.uuid4().hex[:8]
    call(obs.frontend, req, metadata=(("traceparent", f"00-{caller_trace}-{caller_span}-01"),))

    def spans() -> list[dict] | None:
        try:
            lines = [json.loads(ln) for ln in obs.spans.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            return None
        rec = [s for s in lines if s["name"] == "Recommend" and s["attributes"].get("shardrec.request_id") == req.request_id]
        if not rec:
            return None
        rec_id = rec[0]["context"]["span_id"]
        batch = [s for s in lines if s["name"] == "batch" and any(ln["context"]["span_id"] == rec_id for ln in s.get("links", []))]
        if not batch:
            return None
        calls = [s for s in lines if s["name"] == "Lookup" and s["kind"] == "SpanKind.CLIENT" and s["parent_id"] == batch[0]["context"]["span_id"]]
        served = [s for s in lines if s["name"] == "Lookup" and s["kind"] == "SpanKind.SERVER"
                  and s["parent_id"] in {c["context"]["span_id"] for c in calls}]  # fmt: skip
        answered = {c["attributes"]["shardrec.node"] for c in calls if not c["attributes"].get("shardrec.cancelled")}
        if not calls or {s["resource"]["attributes"]["service.instance.id"] for s in served} < answered:
            return None
        return [rec[0], batch[0], calls, served]

    rec, batch, calls, served = wait_for(spans, 20, "the trace of one Recommend in the span file", interval_s=0.2)
    assert rec["context"]["trace_id"] == "0x" + caller_trace and rec["parent_id"] == "0x" + caller_span
    assert batch["parent_id"] is None and batch["context"]["trace_id"] != rec["context"]["trace_id"]
    assert all(c["context"]["trace_id"] == batch["context"]["trace_id"] for c in calls + served)
    nodes = {c["attributes"]["shardrec.node"] for c in calls}
    assert nodes and nodes <= set(obs.metrics_of(ROLE_SHARD))
    for c in calls:
        assert c["attributes"]["shardrec.partitions"] and c["attributes"]["shardrec.request_bytes"] > 0
        assert "shardrec.hedged" in c["attributes"]
    stages = {s["name"] for s in map(json.loads, obs.spans.read_text().splitlines())
              if s.get("parent_id") == batch["context"]["span_id"]}  # fmt: skip
    assert {"features", "lookup", "score", "Lookup"} <= stages


def test_errors_and_logs_carry_the_request_and_trace_ids(obs: Obs):
    bad = recommend_pb2.RecommendRequest(request_id="bad-topk", user_id=1, candidate_item_ids=[1, 2], top_k=0)
    with pytest.raises(grpc.RpcError) as info:
        call(obs.frontend, bad)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"\(request id bad-topk, trace [0-9a-f]{32}\)$", info.value.details()), info.value.details()
    trace_id = re.search(r"trace ([0-9a-f]{32})", info.value.details()).group(1)
    log = Path(obs.cluster.state.record("frontend").log)

    def line():
        for ln in log.read_text().splitlines():
            if ln.startswith("{") and (d := json.loads(ln)).get("request_id") == "bad-topk":
                return d
        return None

    d = wait_for(line, 10, "the failure line of the bad request", interval_s=0.1)
    assert d["level"] == "INFO" and d["status"] == "INVALID_ARGUMENT" and d["trace_id"] == trace_id
    assert d["role"] == "frontend" and d["node"] == "frontend" and d["time"].endswith("Z")


def documented_metrics() -> dict[str, tuple[str, str]]:
    """name -> (section, "moved by" cell) of every metric row in docs/observability.md."""
    out, section = {}, ""
    for ln in DOC.read_text().splitlines():
        if ln.startswith("### "):
            section = ln[4:].strip()
        mm = re.match(r"^\| `(shardrec_[a-z0-9_]+)` \|.*\| ([^|]*) \|$", ln)
        if mm:
            out[mm.group(1)] = (section, mm.group(2).strip())
    return out


class Recorder:
    """Scrapes every frontend and shard endpoint, keeping every scrape."""

    def __init__(self, obs: Obs) -> None:
        self.obs = obs
        self.scrapes: list[tuple[str, str, Samples]] = []  # (process, role, samples)
        self._lock = threading.Lock()

    def __call__(self) -> None:
        for role in (ROLE_FRONTEND, ROLE_SHARD):
            for name, address in self.obs.metrics_of(role).items():
                s = scrape(address, timeout_s=1.0)
                if s is not None:
                    with self._lock:
                        self.scrapes.append((name, role, s))

    @contextlib.contextmanager
    def continuously(self, interval_s: float = 0.25):
        """Scrape every ``interval_s`` on a thread while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                self()

        thread = threading.Thread(target=loop, daemon=True)
        self()
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def moved(self, family: str, role: str) -> bool:
        """Some series of ``family`` took two values, or appeared after the first scrape."""
        series: dict[tuple, set[float]] = {}
        for name, r, samples in self.scrapes:
            if r != role:
                continue
            for (n, labels), v in samples.items():
                if n == family or (n.startswith(family + "_") and n[len(family):] in ("_total", "_count", "_sum", "_bucket")):
                    series.setdefault((name, n, labels), set()).add(v)
        first = {name: s for name, r, s in reversed(self.scrapes) if r == role}
        return any(len(vals) > 1 for vals in series.values()) or any(
            key[2] not in {lab for (n, lab) in first.get(key[0], {})} for key in series
        )


def test_every_documented_metric_moves(obs: Obs):
    """Traffic, a bad request id, an overloaded frontend in degraded modes while Redis is paused
    (sheds, queue, dead requests dropped, store timeouts, its breaker, defaults), a stopped shard
    (SIGSTOP: hedges, stall retries, ejection), a published delta, a corrupt one, a Redis
    restart (the store lost and reloaded), a killed shard: every metric
    of docs/observability.md moves (levels that describe the cluster equal what they describe;
    the exempt ones say why in the doc). Every endpoint is scraped four times a second."""
    rec = Recorder(obs)
    with rec.continuously():
        asyncio.run(open_loop(obs.frontend, obs.requests, 60.0, 3.0))  # traffic
        assert "OK" in asyncio.run(burst(obs.frontend, obs.requests, 16, timeout_s=5.0))  # multi-request batches
        bad_id = recommend_pb2.RecommendRequest()
        bad_id.CopyFrom(obs.requests[1])
        bad_id.request_id = "bad\nid"
        call(obs.frontend, bad_id)

        # Overload: a second frontend (one request a batch, features defaults on loss; scraped
        # once Prometheus reads the new targets file), bursts while Redis is paused: two batches
        # wait on the store (timeouts open its breaker), the rest queue, are shed, or die
        # waiting; then, the breaker open, answers from defaults, degraded for both reasons.
        small = obs.cluster.start_frontend("frontend-small", [
            "--max-queue", "8", "--max-batch", "1", "--degrade-max-candidates", "10", "--on-feature-loss", "defaults",
            "--latency-target-ms", "1"])
        wait_for(lambda: any(t["labels"].get("process") == "frontend-small" and t["health"] == "up" for t in targets(obs.prometheus)),
                 20, "Prometheus to scrape a frontend started later", interval_s=0.2)  # fmt: skip
        redis = obs.cluster.server("redis")
        redis.pause()
        try:
            codes = run_scraped(rec, burst(small, obs.requests, 40, timeout_s=0.3))
            big = [r for r in obs.requests if len(r.candidate_item_ids) > 10]
            degraded = run_scraped(rec, burst(small, big, 4, timeout_s=3.0))  # within a second of the sheds, breaker open
            wait_for(lambda: rec() or 1.0 in values(rec, "shardrec_feature_store_breaker_open"), 10,
                     "a scrape with the feature store's breaker open", interval_s=0.1)  # fmt: skip
        finally:
            redis.resume()
        assert "RESOURCE_EXHAUSTED" in codes, codes
        assert "OK" in degraded, degraded
        # Admitted requests slower than the small frontend's 1 ms target (none is that fast): a
        # closed window (half a second, 20 requests) shrinks its concurrency limit.
        asyncio.run(open_loop(small, obs.requests, 60.0, 1.5))
        wait_for(lambda: rec() or any(v < 8 for v in values(rec, "shardrec_admission_limit")), 10,
                 "a scrape with a shrunk admission limit", interval_s=0.1)  # fmt: skip

        # A stopped shard: hedges, stall retries, an ejection.
        victim = obs.cluster.state.record("shard-1")
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            asyncio.run(open_loop(obs.frontend, obs.requests, 60.0, 2.5))
        finally:
            os.kill(victim.pid, signal.SIGCONT)

        # A published delta (versions, loads, load time, bytes), then a corrupt one (refusals).
        publish_delta(obs, 2, corrupt=False)
        wait_for(lambda: scalar(obs, ROLE_FRONTEND, m.MODEL_VERSION, "frontend") == 2, 60, "the frontend to serve version 2", interval_s=0.1)
        asyncio.run(open_loop(obs.frontend, obs.requests, 40.0, 1.0))
        publish_delta(obs, 3, corrupt=True)
        wait_for(lambda: sum_over(obs, ROLE_SHARD, "shardrec_shard_version_loads_total", result="refused") > 0, 60, "a refusal", interval_s=0.2)

        # The feature store unreachable, then restarted empty (no append-only file): lost, and
        # reloaded by a frontend.
        redis.stop()
        redis.persistence = False
        try:
            with pytest.raises(grpc.RpcError):
                call(obs.frontend, obs.requests[2], timeout_s=3.0)
            rec()
        finally:
            redis.start()
        wait_for(lambda: ok(obs.frontend, obs.requests[3]), 30, "requests to succeed after Redis is back", interval_s=0.1)

        # A killed shard: failovers and UNAVAILABLE errors.
        os.kill(obs.cluster.state.record("shard-2").pid, signal.SIGKILL)
        asyncio.run(open_loop(obs.frontend, obs.requests, 40.0, 2.0))
    rec()

    levels = {  # levels that describe the cluster: checked equal to it
        m.SHARD_MAP_VERSION: lambda: values(rec, m.SHARD_MAP_VERSION) == {1.0},
        "shardrec_live_shard_nodes": lambda: 3 in values(rec, "shardrec_live_shard_nodes"),
        "shardrec_partitions_without_replica": lambda: values(rec, "shardrec_partitions_without_replica") == {0.0},
    }
    docs = documented_metrics()
    assert len(docs) >= 45, sorted(docs)
    stuck = []
    for name, (section, moved_by) in docs.items():
        if moved_by.startswith("exempt"):
            continue
        if name in levels:
            if not levels[name]():
                stuck.append(name)
            continue
        role = ROLE_SHARD if section == "Shard" else ROLE_FRONTEND
        if not rec.moved(name, role):
            stuck.append(name)
    assert not stuck, stuck
    states = {dict(lab)["state"] for _n, _r, s in rec.scrapes for (n, lab), v in s.items() if n == m.FEATURE_STORE_STATE and v == 1}
    assert {"ok", "lost", "unreachable"} <= states, states


def test_alert_rules_and_dashboard_name_only_scraped_metrics(obs: Obs):
    rules = (REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    dashboard = (REPO_ROOT / "deploy" / "grafana" / "shardrec-dashboard.json").read_text()
    named = set(re.findall(r"\bshardrec_[a-z0-9_]+", rules + dashboard))
    scraped: set[str] = set()
    for role in (ROLE_FRONTEND, ROLE_SHARD):
        for address in obs.metrics_of(role).values():
            scraped |= {n for (n, _lab) in (scrape(address) or {})}
    assert named and not named - scraped, sorted(named - scraped)
    with urllib.request.urlopen(f"{obs.prometheus}/api/v1/rules", timeout=10) as r:
        groups = json.load(r)["data"]["groups"]
    assert {rule["name"] for g in groups for rule in g["rules"]} >= {"ShardrecSLOBurnFast", "ShardrecShedding", "ShardrecFeatureStoreLost"}


# -- helpers -------------------------------------------------------------------------------------


def targets(prometheus: str) -> list[dict]:
    with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=10) as r:
        return json.load(r)["data"]["activeTargets"]


async def burst(address: str, requests, n: int, timeout_s: float) -> list[str]:
    """``n`` calls at once over one channel; their status code names."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)

        async def one(req) -> str:
            try:
                await stub.Recommend(req, timeout=timeout_s)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        return list(await asyncio.gather(*(one(requests[i % len(requests)]) for i in range(n))))


def run_scraped(rec: Recorder, coro):
    """Run ``coro`` on a thread while ``rec`` scrapes back to back until it is done (a queue
    that lives a few hundred milliseconds is seen); its result."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(coro)))
    thread.start()
    while thread.is_alive():
        rec()
    thread.join()
    return out[0]


def ok(address: str, req) -> bool:
    try:
        call(address, req, 3.0)
        return True
    except grpc.RpcError:
        return False


def values(rec: Recorder, name: str) -> set[float]:
    return {v for _p, _r, s in rec.scrapes for (n, _lab), v in s.items() if n == name}


def sum_over(obs: Obs, role: str, name: str, **labels: str) -> float:
    total = 0.0
    for address in obs.metrics_of(role).values():
        for (n, lab), v in (scrape(address) or {}).items():
            if n == name and all((k, w) in lab for k, w in labels.items()):
                total += v
    return total


def scalar(obs: Obs, role: str, name: str, process: str) -> float | None:
    s = scrape(obs.metrics_of(role)[process]) or {}
    return next((v for (n, _lab), v in s.items() if n == name), None)


def publish_delta(obs: Obs, version: int, *, corrupt: bool) -> None:
    """Delta ``version`` over ``version - 1`` (the hottest rows changed), set as the target; a
    corrupt one has a flipped byte in its items rows (written behind the publisher's back)."""
    from services.control.cluster import open_cluster
    from services.control.publish import publish_version
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.writer import write_delta

    root = str(obs.cluster.config.checkpoint)
    reader = CheckpointReader(root)
    spec = reader.manifest(version - 1).model
    rng = np.random.default_rng(version)
    rows = {t.name: (np.arange(min(20, t.rows)), rng.normal(size=(min(20, t.rows), t.dim)).astype(np.float32)) for t in spec.tables}
    write_delta(root, version, version - 1, spec, rows)
    with open_cluster(obs.cluster.state.zk, obs.cluster.config.cluster) as (_client, store):
        if not corrupt:
            publish_version(store, CheckpointReader(root), version)
            return
        path = Path(root) / "versions" / str(version) / "tables" / "items.rows.npy"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        store.write_target_version(version)
