"""Micro-batching of concurrent requests on the event loop.

Requests queue (bounded: a full queue answers RESOURCE_EXHAUSTED at once). A batch forms when
a processing slot is free: it takes every queued request (up to ``max_batch``); only while
another batch is still in flight does it wait up to ``max_wait_s`` for more, so an idle server
never delays a lone request. At most ``max_in_flight`` batches run at once.

All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
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
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_batch, max_queue and max_in_flight must be >= 1")
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
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
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if self._in_flight > 0 and self.max_wait_s > 0:
                deadline = loop.time() + self.max_wait_s
                while len(batch) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
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
        try:
            results = await self._process([p.item for p in batch])
        except BaseException as e:  # noqa: BLE001 - delivered to every caller of the batch
            results = [e] * len(batch)
        finally:
            self._in_flight -= 1
            self._slots.release()
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
