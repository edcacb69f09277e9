"""Micro-batching of concurrent requests on the event loop.

Requests queue (bounded: a full queue answers RESOURCE_EXHAUSTED at once). A batch forms when
a processing slot is free: it takes every queued request (up to ``max_batch``); only while
another batch is still in flight does it wait for more, so an idle server never delays a lone
request: up to ``max_wait_s``, or with ``adaptive_wait_s`` set, for a window that grows with
load (``AdaptiveWindow``; docs/configuration.md). At most ``max_in_flight`` batches run at once.

All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.core.errors import ResourceExhaustedError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    multi_item_batches: int = 0
    largest_batch: int = 0
    rejected_full: int = 0
    dropped_gone: int = 0  # queued requests whose callers were gone before a batch formed


class AdaptiveWindow:
    """How long a forming batch waits for more requests while another is in flight: the
    ceiling times the load, the share of time a batch is in flight (batches per second x a
    batch's time, from EWMAs of the gap between arrivals, of batch sizes and of batch times; at
    most 1). So the window is near 0 at low load and grows to the ceiling towards saturation,
    and never reaches past the batch's slack: its earliest deadline less one batch's time.
    Times are ``time.monotonic()`` seconds."""

    def __init__(self, ceiling_s: float, max_batch: int, *, alpha: float = 0.1, longest_gap_s: float = 1.0) -> None:
        self.ceiling_s = ceiling_s
        self.max_batch = max_batch
        self._alpha = alpha
        self._longest_gap_s = longest_gap_s  # an idle spell counts as this long a gap
        self._gap_s: float | None = None
        self._batch_s: float | None = None
        self._size: float | None = None
        self._last: float | None = None

    def _ewma(self, prev: float | None, x: float) -> float:
        return x if prev is None else (1 - self._alpha) * prev + self._alpha * x

    def arrived(self, now: float) -> None:
        if self._last is not None:
            self._gap_s = self._ewma(self._gap_s, min(max(0.0, now - self._last), self._longest_gap_s))
        self._last = now

    def served(self, seconds: float, size: int) -> None:
        self._batch_s = self._ewma(self._batch_s, max(0.0, seconds))
        self._size = self._ewma(self._size, max(1, size))

    def load(self) -> float:
        """The share of time a batch is in flight, 0 to 1 (0 until measured)."""
        if not self._gap_s or self._batch_s is None or self._size is None:
            return 0.0
        return min(1.0, self._batch_s / (self._size * self._gap_s))

    def wait_s(self, size: int, now: float, earliest_deadline: float | None = None) -> float:
        """Seconds a batch of ``size`` may wait, from ``now`` (0: dispatch it now)."""
        if size >= self.max_batch:
            return 0.0
        wait = self.ceiling_s * self.load()
        if earliest_deadline is not None:
            wait = min(wait, earliest_deadline - now - (self._batch_s or 0.0))
        return max(0.0, wait)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``process([... item ...])``'s result for that item.

    ``process(items)`` returns one result per item, in order; a result that is an Exception is
    raised to that item's caller alone. An exception raised by ``process`` fails the whole batch.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        max_in_flight: int = 2,
        adaptive_wait_s: float = 0.0,
        deadline_of: Callable[[T], float] | None = None,
    ) -> None:
        """``adaptive_wait_s`` > 0: the adaptive window up to that long instead of
        ``max_wait_s``, bounded by the slack of ``deadline_of(item)`` (``time.monotonic()``)."""
        if max_batch < 1 or max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_batch, max_queue and max_in_flight must be >= 1")
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.window = AdaptiveWindow(adaptive_wait_s, max_batch) if adaptive_wait_s > 0 else None
        self._deadline_of = deadline_of
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue(maxsize=max_queue)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.stats = BatcherStats()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch right now."""
        return self._queue.qsize()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, item: T) -> R:
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, fut))
        except asyncio.QueueFull:
            self.stats.rejected_full += 1
            raise ResourceExhaustedError(
                f"frontend queue is full ({self._queue.maxsize} requests waiting); retry with backoff"
            ) from None
        if self.window is not None:
            self.window.arrived(time.monotonic())
        return await fut

    def _wait_s(self, batch: list[_Pending[T, R]]) -> float:
        """How much longer ``batch`` may wait for more requests."""
        if self.window is None:
            return self.max_wait_s
        earliest = min(self._deadline_of(p.item) for p in batch) if self._deadline_of is not None else None
        return self.window.wait_s(len(batch), time.monotonic(), earliest)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if self._in_flight > 0 and (wait := self._wait_s(batch)) > 0:
                deadline = loop.time() + wait
                while len(batch) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
                    if self.window is not None:  # a nearer deadline waits less
                        deadline = min(deadline, loop.time() + self._wait_s(batch))
            live = [p for p in batch if not p.future.done()]  # callers that gave up are dropped
            self.stats.dropped_gone += len(batch) - len(live)
            if not live:
                self._slots.release()
                continue
            self._in_flight += 1
            task = loop.create_task(self._dispatch(live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, batch: list[_Pending[T, R]]) -> None:
        s = self.stats
        s.batches += 1
        s.items += len(batch)
        s.largest_batch = max(s.largest_batch, len(batch))
        if len(batch) > 1:
            s.multi_item_batches += 1
        t0 = time.monotonic()
        try:
            results = await self._process([p.item for p in batch])
        except BaseException as e:  # noqa: BLE001 - delivered to every caller of the batch
            results = [e] * len(batch)
        finally:
            self._in_flight -= 1
            self._slots.release()
            if self.window is not None:
                self.window.served(time.monotonic() - t0, len(batch))
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
