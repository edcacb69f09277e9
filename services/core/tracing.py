"""Tracing with OpenTelemetry: the tracer of a process, head sampling, exporters, and W3C trace
context over gRPC metadata (docs/observability.md, "Traces").

``make_tracing`` is called in a process's ``main`` and its ``Tracing`` passed down. Sampling
is decided at the head: a span with a sampled parent is sampled (the caller's ``traceparent``,
or the frontend's for a shard's Lookup); a root span is sampled at ``sample_ratio``; a batch
span (a root linked to the request spans it serves) is sampled when any of those requests is.
With no exporter configured nothing is sampled (spans are non-recording, ids still propagate
and appear in logs and error messages).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
TRACEPARENT = "traceparent"


class HeadSampler(Sampler):
    """ParentBased(TraceIdRatioBased(ratio)), except that a root span linked to a sampled
    span is sampled: a batch is traced when a request it serves is."""

    def __init__(self, ratio: float) -> None:
        self._base = ParentBased(TraceIdRatioBased(ratio) if ratio > 0 else ALWAYS_OFF)
        self._ratio = ratio

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._base.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"HeadSampler(ratio={self._ratio})"


class JsonLinesExporter(SpanExporter):
    """Spans to a file, one JSON object a line (``ReadableSpan.to_json``), appended with one
    ``write`` per export, so several processes may share the file."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> SpanExportResult:
        data = "".join(s.to_json(indent=None) + "\n" for s in spans).encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            os.write(self._fd, data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@dataclass(frozen=True)
class TracingConfig:
    sample_ratio: float = 0.01
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC collector; "" = none
    file: str = ""  # JSON-lines span file; "" = none

    @property
    def exporting(self) -> bool:
        return bool(self.otlp_endpoint or self.file)


class Tracing:
    """A process's tracer (``tracer``) and what flushes it (``shutdown``)."""

    def __init__(self, tracer: trace.Tracer, provider: TracerProvider | None) -> None:
        self.tracer = tracer
        self._provider = provider

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def make_tracing(config: TracingConfig, *, role: str, node: str) -> Tracing:
    """The tracer of one process: ``role`` is the service name, ``node`` its instance id."""
    ratio = config.sample_ratio if config.exporting else 0.0
    provider = TracerProvider(
        sampler=HeadSampler(ratio),
        resource=Resource.create({"service.name": f"shardrec-{role}", "service.instance.id": node}),
    )
    if config.file:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(config.file), schedule_delay_millis=500))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)))
    return Tracing(provider.get_tracer("shardrec"), provider)


def inject(span: trace.Span) -> tuple[str, str] | None:
    """The ``traceparent`` metadata pair naming ``span`` (None for an invalid span): W3C
    version 00, written directly (what the SDK's propagator writes, for a fraction of its
    cost: this runs once per Lookup RPC)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return TRACEPARENT, f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0xFF:02x}"


def remote_parent(metadata) -> trace.SpanContext | None:
    """The span context a ``traceparent`` entry of gRPC ``metadata`` names (W3C version 00:
    ``00-<trace id>-<span id>-<flags>``), or None when there is none or it is malformed."""
    for key, value in metadata or ():
        if key != TRACEPARENT or not isinstance(value, str):
            continue
        parts = value.split("-")
        if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
            return None
        try:
            ctx = trace.SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True, trace_flags=trace.TraceFlags(int(parts[3], 16)))
        except ValueError:
            return None
        return ctx if ctx.is_valid else None
    return None


def extract(metadata) -> Context | None:
    """The remote parent in gRPC ``metadata`` as a context to start a child span in, or None."""
    parent = remote_parent(metadata)
    return None if parent is None else trace.set_span_in_context(trace.NonRecordingSpan(parent))


def end_span(span: trace.Span, code: str) -> None:
    """End an RPC's span with its gRPC status code name (an ERROR status unless ``OK``)."""
    if span.is_recording():
        if code != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.set_attribute("rpc.grpc.status_code", code)
    span.end()


def recording(span: trace.Span | None) -> bool:
    return span is not None and span.is_recording()
