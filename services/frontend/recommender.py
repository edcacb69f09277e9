"""``Recommender.recommend``: one Recommend call, from the decoded request to its
``Recommendation``. It owns the request's deadline (the caller's, or the default), asks
admission control first whether it may queue (``admission``: refused at once with
RESOURCE_EXHAUSTED and a retry hint when not; a refusal is counted, timed and logged at a
limited rate, but gets no span and no validation: it is decided in tens of microseconds, and
most of its cost is gRPC's own per-call work), replaces a missing or unusable request id by a generated one, validates the
request BEFORE batching (``validate``: a bad request fails alone), applies the
operator's degraded mode under pressure, and waits for its answer from the micro-batcher
(``batching``), whose batches run ``pipeline.RecommendPipeline``. docs/overload.md has the rules.

Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace

from opentelemetry.context import Context

from services._proto.shardrec.v1 import recommend_pb2
from services.core.errors import DeadlineExceededError, ResourceExhaustedError
from services.core.logs import current_trace_id, ids_suffix
from services.core.metrics import FrontendReading
from services.core.types import Version
from services.frontend.admission import Admission
from services.frontend.batch import Pending, RecRequest, Recommendation
from services.frontend.batching import MicroBatcher
from services.frontend.observe import Observer
from services.frontend.pipeline import RecommendPipeline
from services.frontend.validate import RequestValidator, clean_request_id

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class DegradePolicy:
    """The cheaper mode the operator may enable (off by default): while admission is shedding
    (a shed within the last ``pressure_window_s``), a request with more than ``max_candidates``
    candidates has only its first ``max_candidates`` scored; its answer says so."""

    max_candidates: int = 0  # 0 = off
    pressure_window_s: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.max_candidates > 0


class Recommender:
    def __init__(
        self,
        validator: RequestValidator,
        pipeline: RecommendPipeline,
        batcher: MicroBatcher[Pending, Recommendation],
        admission: Admission,
        *,
        default_timeout_s: float,
        degrade: DegradePolicy = DegradePolicy(),
        observer: Observer | None = None,
    ) -> None:
        self._validator = validator
        self._pipeline = pipeline
        self._batcher = batcher
        self._admission = admission
        self._default_timeout_s = default_timeout_s
        self._degrade = degrade
        self._obs = observer or Observer.off()
        self.request_ids_replaced = 0
        self.degraded_candidates_capped = 0

    @property
    def version(self) -> Version:
        """The version new batches are computed at."""
        return self._pipeline.version

    async def recommend(
        self, request: recommend_pb2.RecommendRequest, *, timeout_s: float | None = None, caller: str = ANONYMOUS,
        parent: Context | None = None,
    ) -> Recommendation:
        """The top-k of ``request`` within ``timeout_s`` (None: the default timeout), for
        ``caller`` (the identity per-caller limits apply to); ``parent``: the caller's trace
        context, if it sent one. Raises InvalidArgumentError (bad request),
        ResourceExhaustedError (shed; with ``retry_after_s``), and DeadlineExceededError when
        the deadline passes first; every error's message ends with the request and trace ids."""
        t0 = time.monotonic()
        remaining = self._default_timeout_s if timeout_s is None else timeout_s
        shed = self._admission.check(caller, remaining, self._batcher.queued, t0)
        if shed is not None:
            raise self._refusal(request, shed, parent, t0)
        pending: Pending | None = None
        try:
            with self._obs.request(parent, t0) as scope:
                if clean_request_id(request.request_id) is None:
                    if request.request_id:
                        self.request_ids_replaced += 1
                        log.info("replacing an unusable request id (%d chars, not printable ASCII or too long)", len(request.request_id))
                    request.request_id = uuid.uuid4().hex
                scope.named(request.request_id)
                req = self._validator.validate(request)  # bad input never joins a batch
                req, reasons = self._maybe_degrade(req, t0)
                pending = Pending(req, t0 + remaining, arrived=t0, span=scope.span)
                try:
                    rec = await asyncio.wait_for(self._batcher.submit(pending), remaining)
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"request {req.request_id!r} did not finish within its deadline of {remaining * 1e3:.0f} ms"
                    ) from None
                return replace(rec, degraded_reasons=(*reasons, *rec.degraded_reasons)) if reasons else rec
        finally:
            if pending is not None:
                pending.abandoned = True  # answered, failed, timed out or cancelled: nothing more to do for it
            now = time.monotonic()
            self._admission.finished(now - t0, now)

    def _refusal(self, request: recommend_pb2.RecommendRequest, shed, parent: Context | None, t0: float) -> ResourceExhaustedError:
        """The error of a request admission refused, counted and timed (``Observer.refused``)."""
        rid = clean_request_id(request.request_id)
        err = ResourceExhaustedError(
            f"{shed.message}; retry in {shed.retry_after_s * 1e3:.0f} ms{ids_suffix(rid, current_trace_id(parent) if parent else None)}", retry_after_s=shed.retry_after_s
        )
        elapsed = time.monotonic() - t0
        self._admission.record_shed_time(elapsed)
        self._obs.refused(err, rid, elapsed)
        return err

    def _maybe_degrade(self, req: RecRequest, now: float) -> tuple[RecRequest, tuple[int, ...]]:
        d = self._degrade
        if not d.enabled or len(req.candidates) <= d.max_candidates or not self._admission.pressured(now, d.pressure_window_s):
            return req, ()
        self.degraded_candidates_capped += 1
        capped = replace(req, candidates=req.candidates[: d.max_candidates], top_k=min(req.top_k, d.max_candidates))
        return capped, (recommend_pb2.DEGRADED_CANDIDATES_CAPPED,)

    def reading(self) -> FrontendReading:
        """Admission, batcher and pipeline counters and levels (``core.metrics``)."""
        b, a = self._batcher.stats, self._admission
        p99 = a.shed_p99_s()
        r = FrontendReading(
            admitted=a.admitted,
            shed={**a.shed, "queue_full": b.rejected_full},
            dropped={"batching": b.dropped_gone},
            request_ids_replaced=self.request_ids_replaced,
            degraded={"candidates_capped": self.degraded_candidates_capped},
            batches=b.batches,
            batched_requests=b.items,
            multi_request_batches=b.multi_item_batches,
            largest_batch=b.largest_batch,
            queued=self._batcher.queued,
            in_flight=a.in_flight,
            admission_limit=a.limit.value,
            shed_p99_s=0.0 if p99 is None else p99,
        )
        self._pipeline.fill(r)
        return r
