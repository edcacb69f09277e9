"""``Recommender.recommend``: one Recommend call, from the decoded request to its
``Recommendation``. It owns the request's deadline (the caller's, or the default), gives the
request an id when it has none, validates it BEFORE batching (``validate``: a bad request fails
alone), and waits for its answer from the micro-batcher (``batching``), whose batches run
``pipeline.RecommendPipeline``.

Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from services._proto.shardrec.v1 import recommend_pb2
from services.core.errors import DeadlineExceededError
from services.core.types import Version
from services.frontend.batch import Pending, Recommendation
from services.frontend.batching import MicroBatcher
from services.frontend.pipeline import RecommendPipeline
from services.frontend.validate import RequestValidator


class Recommender:
    def __init__(
        self,
        validator: RequestValidator,
        pipeline: RecommendPipeline,
        batcher: MicroBatcher[Pending, Recommendation],
        *,
        default_timeout_s: float,
    ) -> None:
        self._validator = validator
        self._pipeline = pipeline
        self._batcher = batcher
        self._default_timeout_s = default_timeout_s

    @property
    def version(self) -> Version:
        """The version new batches are computed at."""
        return self._pipeline.version

    async def recommend(self, request: recommend_pb2.RecommendRequest, *, timeout_s: float | None = None) -> Recommendation:
        """The top-k of ``request`` within ``timeout_s`` (None: the default timeout). Raises
        InvalidArgumentError / ResourceExhaustedError (bad request, full queue), and
        DeadlineExceededError when the deadline passes first."""
        remaining = self._default_timeout_s if timeout_s is None else timeout_s
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        req = self._validator.validate(request)  # bad input never joins a batch
        try:
            return await asyncio.wait_for(self._batcher.submit(Pending(req, time.monotonic() + remaining)), remaining)
        except TimeoutError:
            raise DeadlineExceededError(
                f"request {req.request_id!r} did not finish within its deadline of {remaining * 1e3:.0f} ms"
            ) from None

    def counters(self) -> dict[str, int]:
        """The batcher's and the pipeline's counters, by their ``FrontendAdmin.GetStats`` names."""
        b = self._batcher.stats
        return {
            "batches": b.batches,
            "requests_batched": b.items,
            "multi_request_batches": b.multi_item_batches,
            "largest_batch": b.largest_batch,
            "rejected_queue_full": b.rejected_full,
            **self._pipeline.counters(),
        }
