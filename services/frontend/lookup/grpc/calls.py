"""One Lookup RPC: the units planned on one node encoded as one ``LookupRequest``, sent under
the batch's remaining deadline over a pooled channel, the answer decoded; the replica board's
bookkeeping (outstanding calls, probes, latency, ejection) and the RPC counters.

Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2
from services.core import wire
from services.core.clients import make_channel
from services.core.errors import DeadlineExceededError, UnavailableError
from services.core.tls import TlsMaterial
from services.core.tracing import inject
from services.core.types import PoolingType, Version
from services.frontend.lookup import LookupStats
from services.frontend.lookup.grpc.replicas import HedgeBudget, ReplicaBoard
from services.frontend.lookup.grpc.routing import Unit
from services.frontend.observe import Observer
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)

_POOLING = {PoolingType.SUM: embedding_pb2.POOLING_SUM, PoolingType.MEAN: embedding_pb2.POOLING_MEAN, PoolingType.MAX: embedding_pb2.POOLING_MAX}
# Statuses that eject the node for a while (it is down, partitioned away or stalled). Routing
# policy, not retryability (which ``services.core.errors`` decides): which failures say that the
# node itself is unwell, so new calls should avoid it for a while.
_EJECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_RENEW_GRACE_S = 5.0


class ChannelPool:
    """One grpc.aio channel (and stub) per node address, reused for the process's life, or
    until another process registers at that address (``renew``); TLS (mTLS: the frontend's
    certificate is its client certificate) when ``tls`` is given, and the cluster token on
    every call when ``token`` is. When the TLS files are rotated (``tls.generation`` moves),
    new calls get new channels; the old ones close after ``drain_s``, once their calls have
    ended. ``options``: more channel options (keepalive)."""

    def __init__(
        self, max_message_bytes: int, *, tls: TlsMaterial | None = None, token: Callable[[], str] | None = None,
        drain_s: float = 60.0, options: Sequence[tuple[str, int]] = (),
    ) -> None:  # fmt: skip
        self._max_message_bytes = max_message_bytes
        self._options = tuple(options)
        self._tls = tls
        self._token = token
        self._drain_s = drain_s
        self._generation = tls.generation if tls is not None else 0
        self._stubs: dict[str, embedding_pb2_grpc.EmbeddingShardStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task] = set()

    def renew(self, address: str) -> None:
        """The process at ``address`` is gone (another serves it now, or none): the next call
        gets a fresh channel, not one waiting out the reconnection backoff it took while the
        old process was gone. Calls in flight on the old channel may finish within
        ``_RENEW_GRACE_S``."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.ensure_future(channel.close(grace=_RENEW_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def stub(self, address: str) -> embedding_pb2_grpc.EmbeddingShardStub:
        if self._tls is not None and self._tls.generation != self._generation:
            self._retire()
        stub = self._stubs.get(address)
        if stub is None:
            creds = self._tls.channel_credentials() if self._tls is not None else None
            channel = make_channel(address, max_message_bytes=self._max_message_bytes, options=self._options, credentials=creds)
            self._channels[address] = channel
            stub = self._stubs[address] = embedding_pb2_grpc.EmbeddingShardStub(channel)
        return stub

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every Lookup carries besides its request id: the cluster token, if any."""
        return (("authorization", f"Bearer {self._token()}"),) if self._token is not None else ()

    def _retire(self) -> None:
        assert self._tls is not None
        self._generation = self._tls.generation
        old = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        self._retired += old
        log.info("TLS files changed: new shard channels; %d old ones close in %.0fs", len(old), self._drain_s)

        async def close_later() -> None:
            await asyncio.sleep(self._drain_s)  # calls on them end within their deadlines
            for ch in old:
                self._retired.remove(ch)
            await asyncio.gather(*(c.close() for c in old), return_exceptions=True)

        asyncio.get_running_loop().create_task(close_later())

    async def close(self) -> None:
        channels = [*self._channels.values(), *self._retired]
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)


@dataclass(frozen=True)
class Call:
    """What every RPC of one plan shares."""

    version: Version
    map_version: int
    deadline: float
    request_id: str


class ShardCalls:
    """Starts Lookup RPCs; shares the client's ``board``, ``budget`` and ``stats``. With
    ``float16``, a request none of whose bags is weighted asks for float16 pooled vectors (half
    the answer's bytes; docs/fanout.md gives the error bound), widened to float32 on arrival; a
    weighted bag could pool beyond float16's range, so its request stays float32."""

    def __init__(self, view: ClusterView, channels: ChannelPool, board: ReplicaBoard, budget: HedgeBudget,
                 stats: LookupStats, observer: Observer | None = None, *, float16: bool = False) -> None:
        self._view = view
        self._float16 = float16
        self._channels = channels
        self._board = board
        self._budget = budget
        self._stats = stats
        self._obs = observer or Observer.off()

    def _request(self, units: list[Unit], version: Version, map_version: int, request_id: str) -> embedding_pb2.LookupRequest:
        req = embedding_pb2.LookupRequest(request_id=request_id, version=version, shard_map_version=map_version)
        if self._float16 and all(u.sub.weights is None for u in units):
            req.output_dtype = tensor_pb2.DTYPE_FLOAT16
        for u in units:
            g = req.groups.add(table=u.table, partition=u.partition, pooling=_POOLING[u.pooling])
            wire.encode(u.sub.ids, g.ids)
            wire.encode(u.sub.lengths, g.lengths)
            if u.sub.weights is not None:
                wire.encode(u.sub.weights, g.weights)
        return req

    def spawn(self, node: str, units: list[Unit], call: Call, *, hedge: bool, stall: bool = False) -> asyncio.Task:
        """Start the Lookup of ``units`` on ``node`` as a task; the board counts it outstanding
        (and as the node's probe, when it is one) from now until the task is done, cancelled
        before it ran included. The task's result: ``[(unit, pooled, counts)]`` in unit order."""
        probe = self._board.begin(node, time.monotonic())
        if not hedge:
            self._budget.earn()
        task = asyncio.ensure_future(self._call(node, units, call, hedge=hedge, stall=stall))
        task.add_done_callback(lambda _t: self._board.end(node, probe))
        return task

    async def _call(self, node: str, units: list[Unit], call: Call, *, hedge: bool, stall: bool = False):
        address = self._view.last_addresses.get(node)
        if address is None:
            raise UnavailableError(f"node {node} has never registered")
        req = self._request(units, call.version, call.map_version, call.request_id)
        start = time.monotonic()
        timeout = call.deadline - start
        if timeout <= 0:
            raise DeadlineExceededError("deadline passed before the shard lookups were sent")
        stats = self._stats
        kind = "stall_retry" if stall else "hedge" if hedge else "primary"
        if stall:
            stats.stall_retries += 1
        elif hedge:
            stats.hedges += 1
        else:
            stats.rpcs += 1
        stats.count(stats.per_node_rpcs, node)
        stats.count(stats.per_node_calls, (node, kind))
        sent = req.ByteSize()
        stats.request_bytes += sent
        span, metadata = self._trace(node, units, kind, sent, call.request_id)
        try:
            metadata = (*metadata, *self._channels.metadata())  # the cluster token, if any
            resp = await self._channels.stub(address).Lookup(req, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            stats.count(stats.per_node_errors, (node, e.code().name))
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, e.code().name))
                span.end()
            if self._blame(node, e.code(), start, call.deadline) and self._board.failed(node, time.monotonic()):
                self.ejected(node, describe(e))
            raise
        except BaseException:  # cancelled (a hedge won, the batch is gone)
            if span is not None:
                span.set_attribute("shardrec.cancelled", True)
                span.end()
            raise
        now = time.monotonic()
        self._board.succeeded(node, now - start, now)
        self._obs.metrics.lookup(node, now - start)
        out = []
        received = 0
        dtype = "float16" if req.output_dtype == tensor_pb2.DTYPE_FLOAT16 else "float32"
        for u, r in zip(units, resp.results, strict=True):
            pooled = wire.decode(r.pooled, "pooled", dtype=dtype, ndim=2)
            counts = wire.decode(r.counts, "counts", dtype="int32", ndim=1)
            received += pooled.nbytes + counts.nbytes
            stats.add_wire_bytes(u.side, u.request_bytes + pooled.nbytes + counts.nbytes)
            out.append((u, pooled.astype(np.float32) if dtype == "float16" else pooled, counts))
        stats.response_bytes += received
        if span is not None:
            span.set_attribute("shardrec.response_bytes", received)
            span.end()
        return out

    def _trace(self, node: str, units: list[Unit], kind: str, sent: int, request_id: str):
        """The Lookup's span (None unless its batch is traced) and its metadata: the batch's
        tag and the W3C ``traceparent`` naming the Lookup span, or the batch span (not traced:
        the shard then records nothing either)."""
        parent = trace.get_current_span()
        span = None
        if parent.is_recording():
            span = self._obs.tracer.start_span("Lookup", kind=SpanKind.CLIENT, attributes={
                "shardrec.node": node,
                "shardrec.partitions": sorted({f"{u.table}/{u.partition}" for u in units}),
                "shardrec.request_bytes": sent,
                "shardrec.hedged": kind != "primary",
                "shardrec.lookup_kind": kind,
            })  # fmt: skip
        traceparent = inject(span or parent)
        metadata = (("x-request-id", request_id),) if traceparent is None else (("x-request-id", request_id), traceparent)
        return span, metadata

    def _blame(self, node: str, code: grpc.StatusCode, sent: float, deadline: float) -> bool:
        """Is ``node`` at fault for a call sent at ``sent`` that failed with ``code``? Unreachable
        (UNAVAILABLE): yes. Late (DEADLINE_EXCEEDED at ``deadline``): only when a peer answered,
        by that deadline, a call sent after it, so the frontend's own queueing or want of CPU
        never ejects a healthy shard."""
        if code not in _EJECT:
            return False
        return code is not grpc.StatusCode.DEADLINE_EXCEEDED or self._board.outpaced(node, sent, deadline)

    def ejected(self, node: str, why: str) -> None:
        """Count and log an ejection the board just decided."""
        self._stats.ejections += 1
        self._stats.count(self._stats.per_node_ejections, node)
        until = self._board.stats(node).ejected_until or 0.0
        log.warning("ejected shard %s for %.2fs (%s)", node, until - time.monotonic(), why)

    async def close(self) -> None:
        await self._channels.close()


def cancel_pending(tasks) -> int:
    """Cancel the tasks not done yet; how many were. Every task's outcome counts as seen from
    here on: a loser that failed (or fails while it is being cancelled) is not logged as
    "Task exception was never retrieved"."""
    n = 0
    for t in list(tasks):
        if not t.done():
            t.cancel()
            n += 1
        t.add_done_callback(_seen)
    return n


def _seen(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
