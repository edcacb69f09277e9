"""The frontend's observations (docs/observability.md): per request, a span (a child of the
caller's ``traceparent`` when it sent one), its request id in the log context, its latency by
status code, one failure line when it fails, and the ids appended to the error message; per
batch, a root span linked to the request spans it serves, one span and one histogram observe
per stage; and ``frontend_reading``, the counters read at scrape time.

Runs on the event loop (``frontend_reading`` on the metrics thread: it copies what it reads).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from prometheus_client import CollectorRegistry

from services.core.errors import ShardrecError
from services.core.logs import FailureLog, request_scope, with_ids
from services.core.metrics import FrontendMetrics, FrontendReading, NodeReading
from services.core.tracing import end_span, recording

log = logging.getLogger("shardrec.frontend.requests")


class RequestScope:
    """One Recommend call being served: ``span`` (None when not traced), ``request_id``."""

    def __init__(self, span, t0: float) -> None:
        self.span = span
        self.t0 = t0
        self.request_id: str | None = None
        self._token = None

    def named(self, request_id: str) -> None:
        """The request's (cleaned) id: into the log context and the span."""
        self.request_id = request_id
        if self._token is not None:
            self._token.close()
        self._token = request_scope(request_id)
        self._token.__enter__()
        if recording(self.span):
            self.span.set_attribute("shardrec.request_id", request_id)


class Observer:
    """Metrics, tracer and failure log of one frontend, for the recommender, the pipeline and
    the lookup step."""

    def __init__(self, metrics: FrontendMetrics, tracer: trace.Tracer, failures: FailureLog | None = None) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.failures = failures or FailureLog(log)

    @classmethod
    def off(cls) -> "Observer":
        """Records nothing (tests, tools that build a pipeline without a process)."""
        return cls(FrontendMetrics(CollectorRegistry(), FrontendReading, enabled=False), trace.NoOpTracer())

    @contextlib.contextmanager
    def request(self, parent: Context | None, t0: float) -> Iterator[RequestScope]:
        """Observe one Recommend call (its latency counted from ``t0``). An error leaving the
        block is logged (rate-limited) and re-raised with ``(request id R, trace T)`` appended
        to its message (a ShardrecError; anything else is the edge's INTERNAL)."""
        span = self.tracer.start_span("Recommend", context=parent, kind=SpanKind.SERVER)
        scope = RequestScope(span, t0)
        code = "OK"
        try:
            with trace.use_span(span, end_on_exit=False):
                try:
                    yield scope
                except BaseException as e:
                    code = _code_of(e)
                    self.failures.failed(code, f"Recommend {scope.request_id or '-'}", str(e) or type(e).__name__)
                    out = with_ids(e) if isinstance(e, ShardrecError) else e
                    if out is e:
                        raise
                    raise out from e
        finally:
            self.metrics.request_done(code, time.monotonic() - t0)
            end_span(span, code)
            if scope._token is not None:
                scope._token.__exit__(None, None, None)

    def refused(self, err: ShardrecError, request_id: str | None, seconds: float) -> None:
        """A call admission refused: its latency by status code and a rate-limited failure line;
        no span (refusing must stay cheap under a flood)."""
        self.metrics.request_done(err.grpc_code, seconds)
        self.failures.failed(err.grpc_code, f"Recommend {request_id or '-'}", str(err))

    def batch_span(self, spans: list) -> trace.Span:
        """A root span for one micro-batch, linked to the traced request spans it serves
        (sampled when one of them is: ``core.tracing.HeadSampler``)."""
        links = [Link(s.get_span_context()) for s in spans if recording(s)]
        return self.tracer.start_span("batch", context=Context(), links=links, attributes={"shardrec.batch_size": len(spans)})

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage of the current batch: a histogram observe, and a child span of the
        batch span when it is traced."""
        parent = trace.get_current_span()
        span = self.tracer.start_span(name) if parent.is_recording() else None
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage(name, time.perf_counter() - t0)
            if span is not None:
                span.end()

    def queued(self, items, now: float) -> None:
        """Each request's wait from arrival to its batch (a span under its request span when
        traced)."""
        now_ns = time.time_ns()
        for p in items:
            wait = now - p.arrived
            self.metrics.stage("queue", wait)
            if recording(p.span):
                ctx = trace.set_span_in_context(p.span)
                self.tracer.start_span("queue", context=ctx, start_time=now_ns - int(wait * 1e9)).end(end_time=now_ns)


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, ShardrecError):
        return exc.grpc_code
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "CANCELLED"
    import asyncio

    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"


def frontend_reading(recommender, lookup, view, sync=None) -> FrontendReading:
    """Every counter and level of the frontend's serving objects, and of its feature store
    reloads (``sync``); copied, so a scrape from the metrics thread sees a consistent-enough
    picture without locking the loop."""
    r = recommender.reading()
    if sync is not None:
        r.feature_store_reloads = {"ok": sync.reloads, "failed": sync.reload_failures}
    st = lookup.stats
    r.lookup_batches, r.lookup_ids = st.batches, st.ids_sent
    r.lookup_hedge_wins, r.lookup_hedges_cancelled = st.hedge_wins, st.hedges_cancelled
    r.lookup_bytes_sent, r.lookup_bytes_received = st.request_bytes, st.response_bytes
    r.wire_bytes = dict(st.wire_bytes_by_side)
    cache = getattr(lookup, "cache", None)
    if cache is not None:
        r.cache_ids = {"hit": cache.hits, "miss": cache.misses, "bypass": cache.bypassed}
        r.cache_offered = {"admitted": cache.admitted, "rejected": cache.rejected}
        r.cache_evictions = cache.evicted
        r.cache_dropped = {"delta": cache.invalidated, "flush": cache.flushed}
        r.cache_rows, r.cache_capacity_rows, r.cache_bytes = cache.rows_held, cache.capacity, cache.nbytes
    board = getattr(lookup, "board", None)
    nodes: dict[str, NodeReading] = {}
    for (node, kind), n in dict(st.per_node_calls).items():
        nodes.setdefault(node, NodeReading()).rpcs[kind] = n
    for (node, code), n in dict(st.per_node_errors).items():
        nodes.setdefault(node, NodeReading()).errors[code] = n
    for attr, counts in (("failovers", st.per_node_failovers), ("reroutes", st.per_node_reroutes), ("ejections", st.per_node_ejections)):
        for node, n in dict(counts).items():
            setattr(nodes.setdefault(node, NodeReading()), attr, n)
    if board is not None:
        now = time.monotonic()
        for node, s in dict(board.nodes).items():
            reading = nodes.setdefault(node, NodeReading())
            reading.outstanding = s.outstanding
            reading.ejected = s.ejected_until is not None and s.ejected_until > now
    r.nodes = nodes
    if view is not None:
        smap = view.shard_map
        r.live_nodes = len(view.nodes)
        r.partitions_without_replica = len(view.missing_partitions()) if smap is not None else 0
        r.shard_map_version = 0 if smap is None else smap.version
    return r
