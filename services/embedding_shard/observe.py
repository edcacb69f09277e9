"""The shard's observations (docs/observability.md): per Lookup, a server span (a child of the
frontend's Lookup span, from the ``traceparent`` metadata), its latency by status code and its
pooling time, the caller's ``x-request-id`` (the batch's tag) in the log context, one failure
line when it fails and the ids appended to the error message; and ``shard_reading``, the
counters read at scrape time.

``LookupObserver.lookup`` runs on the RPC threads; ``shard_reading`` on the metrics thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from services.core.errors import ShardrecError
from services.core.logs import FailureLog, request_scope, with_ids
from services.core.metrics import PartitionReading, ShardMetrics, ShardReading
from services.core.tracing import end_span, remote_parent

log = logging.getLogger("shardrec.shard.lookups")
REQUEST_ID_KEY = "x-request-id"


class LookupScope:
    """One Lookup being served."""

    def __init__(self, observer: "LookupObserver", span) -> None:
        self._obs = observer
        self._span = span

    def groups(self, groups) -> None:
        if self._span.is_recording():
            self._span.set_attributes({
                "shardrec.partitions": sorted({f"{g.table}/{g.partition}" for g in groups}),
                "shardrec.ids": sum(len(g.ids) for g in groups),
                "shardrec.bags": sum(len(g.lengths) for g in groups),
            })  # fmt: skip

    @contextlib.contextmanager
    def pooling(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._obs.metrics.pooled(time.perf_counter() - t0)

    def answered(self, nbytes: int) -> None:
        if self._span.is_recording():
            self._span.set_attribute("shardrec.response_bytes", nbytes)


class LookupObserver:
    def __init__(self, node_id: str, metrics: ShardMetrics, tracer: trace.Tracer, failures: FailureLog | None = None) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.tracer = tracer
        self.failures = failures or FailureLog(log)

    @classmethod
    def off(cls, node_id: str) -> "LookupObserver":
        return cls(node_id, ShardMetrics(CollectorRegistry(), ShardReading, enabled=False), trace.NoOpTracer())

    @contextlib.contextmanager
    def lookup(self, metadata, request_bytes: int) -> Iterator[LookupScope]:
        """Observe one Lookup; an error leaving the block is logged (rate-limited) and
        re-raised with ``(request id R, trace T)`` appended to its message."""
        t0 = time.perf_counter()
        request_id = next((v for k, v in metadata or () if k == REQUEST_ID_KEY and isinstance(v, str)), None)
        parent = remote_parent(metadata)
        if parent is not None and not parent.trace_flags.sampled:
            span = trace.NonRecordingSpan(parent)  # the frontend did not sample it: only its ids, for the logs
        else:
            context = None if parent is None else trace.set_span_in_context(trace.NonRecordingSpan(parent))
            span = self.tracer.start_span("Lookup", context=context, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes({"shardrec.node": self.node_id, "shardrec.request_bytes": request_bytes})
        code = "OK"
        try:
            with trace.use_span(span, end_on_exit=False), request_scope(request_id):
                try:
                    yield LookupScope(self, span)
                except ShardrecError as e:
                    code = e.grpc_code
                    self.failures.failed(code, f"Lookup {request_id or '-'}", str(e))
                    out = with_ids(e)
                    if out is e:
                        raise
                    raise out from e
                except Exception:
                    code = "INTERNAL"  # the edge logs it with its traceback under an incident id
                    raise
        finally:
            self.metrics.lookup_done(code, time.perf_counter() - t0)
            end_span(span, code)


def shard_reading(store, versions, map_version: int) -> ShardReading:
    """Every counter and level of the shard's store and version manager (read without locks:
    best-effort, like the counters themselves)."""
    parts = {}
    for pid, held in store.partitions().items():
        parts[(pid.table, f"{pid.partition}of{pid.num_partitions}")] = PartitionReading(
            held.lookups, held.ids, held.bags, store.size_bytes(pid)
        )
    return ShardReading(
        partitions=parts,
        versions_ready=tuple(store.versions_ready),
        serving_version=store.primary,
        target_version=versions.target or 0,
        shard_map_version=map_version,
        loads=versions.loads,
        refusals=versions.refusals,
    )
