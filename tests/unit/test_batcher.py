"""The micro-batcher on a real event loop: idle requests go at once, concurrent ones share
batches, a full queue answers RESOURCE_EXHAUSTED, per-item errors reach only their caller; the
adaptive window grows with load and stays within the batch's deadline slack."""

import asyncio

import pytest

from services.core.errors import ResourceExhaustedError
from services.frontend.batching import AdaptiveWindow, MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_lone_request_is_not_delayed_and_concurrent_ones_batch():
    async def main():
        release = asyncio.Event()
        seen = []

        async def process(items):
            seen.append(list(items))
            if len(seen) == 1:
                await release.wait()  # hold the first batch in flight
            return [x * 10 for x in items]

        b = MicroBatcher(process, max_batch=8, max_wait_s=10.0, max_queue=100, max_in_flight=1)
        b.start()
        first = asyncio.ensure_future(b.submit(1))
        while not seen:  # the lone request is dispatched without waiting for max_wait_s
            await asyncio.sleep(0)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 6)]
        await asyncio.sleep(0)
        release.set()
        assert await first == 10
        assert await asyncio.gather(*rest) == [20, 30, 40, 50]
        await b.stop()
        return seen, b.stats

    seen, stats = run(main())
    assert seen == [[1], [2, 3, 4, 5]]
    assert stats.multi_item_batches == 1 and stats.largest_batch == 4


def test_full_queue_is_resource_exhausted():
    async def main():
        block = asyncio.Event()

        async def process(items):
            await block.wait()
            return items

        b = MicroBatcher(process, max_batch=1, max_wait_s=0, max_queue=2, max_in_flight=1)
        b.start()
        waiting = [asyncio.ensure_future(b.submit(0))]
        while b.stats.batches == 0:  # the first request is in flight, holding the only slot
            await asyncio.sleep(0)
        waiting += [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # fill the queue
        # Ready tasks run in the order they were created, before this one resumes: both
        # submits have queued their request (the batcher holds them: its only slot is busy).
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhaustedError, match="queue is full"):
            await b.submit(99)
        block.set()
        assert await asyncio.gather(*waiting) == [0, 1, 2]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_per_item_error_reaches_only_its_caller():
    async def main():
        async def process(items):
            return [ValueError(f"bad {x}") if x < 0 else x for x in items]

        b = MicroBatcher(process, max_batch=4, max_wait_s=0, max_queue=10)
        b.start()
        good, bad = b.submit(1), b.submit(-1)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await b.stop()
        return results

    good, bad = run(main())
    assert good == 1 and isinstance(bad, ValueError)


def test_unique_bags_pool_each_distinct_bag_once():
    import numpy as np

    from services.frontend.batch import Bags, unique_bags

    single = Bags(np.array([5, 3, 5, 5, 3], np.int64), np.ones(5, np.int32))
    u, inv = unique_bags(single)
    assert u.rows.tolist() == [3, 5] and u.lengths.tolist() == [1, 1] and inv.tolist() == [1, 0, 1, 1, 0]

    multi = Bags(np.array([1, 2, 7, 1, 2, 2, 1], np.int64), np.array([2, 1, 0, 2, 2, 0], np.int32))
    u, inv = unique_bags(multi)
    # every original bag equals its unique twin, element by element
    offs = np.concatenate(([0], np.cumsum(multi.lengths)))
    uoffs = np.concatenate(([0], np.cumsum(u.lengths)))
    for b in range(len(multi.lengths)):
        j = inv[b]
        assert multi.rows[offs[b]:offs[b + 1]].tolist() == u.rows[uoffs[j]:uoffs[j + 1]].tolist()
    assert len(u.lengths) == 4  # [1,2], [7], [], [2,1] (order matters: [2,1] != [1,2])

    distinct = Bags(np.array([1, 2, 3], np.int64), np.ones(3, np.int32))
    assert unique_bags(distinct) == (distinct, None)
    weighted = Bags(np.array([1, 1], np.int64), np.ones(2, np.int32), np.ones(2, np.float32))
    assert unique_bags(weighted)[1] is None


def loaded(gap_s: float, batch_s: float, size: int = 1, *, ceiling_s: float = 0.010, max_batch: int = 64) -> AdaptiveWindow:
    """A window that saw arrivals ``gap_s`` apart and batches of ``size`` taking ``batch_s``."""
    w = AdaptiveWindow(ceiling_s, max_batch)
    for i in range(200):
        w.arrived(i * gap_s)
        w.served(batch_s, size)
    return w


def test_adaptive_window_is_zero_when_idle_and_grows_with_load():
    assert AdaptiveWindow(0.010, 64).wait_s(1, 0.0) == 0.0  # nothing measured yet
    # a batch in flight 10%, 50%, 100% of the time (batches per second x a batch's time)
    loads = [loaded(gap, 0.005, size) for gap, size in ((0.050, 1), (0.005, 2), (0.001, 4))]
    assert [w.load() for w in loads] == pytest.approx([0.1, 0.5, 1.0])
    assert [w.wait_s(1, 0.0) for w in loads] == pytest.approx([0.001, 0.005, 0.010])
    assert loaded(0.0001, 0.050).wait_s(1, 0.0) == pytest.approx(0.010)  # at most the ceiling
    assert loaded(0.001, 0.005, max_batch=8).wait_s(8, 0.0) == 0.0  # full: go
    w = loaded(0.001, 0.005)
    w.arrived(1e6)  # a long idle spell counts as a 1 s gap, not more
    assert w.load() < 1.0


def test_adaptive_window_stays_within_the_deadline_slack():
    w = loaded(0.0001, 0.004, ceiling_s=0.050)
    assert w.wait_s(1, 10.0, earliest_deadline=10.100) == pytest.approx(0.050)
    assert w.wait_s(1, 10.0, earliest_deadline=10.005) == pytest.approx(0.001)  # 5 ms left, 4 ms to serve
    assert w.wait_s(1, 10.0, earliest_deadline=10.003) == 0.0
    assert w.wait_s(1, 10.0, earliest_deadline=9.0) == 0.0


def test_adaptive_batcher_fills_under_load_and_never_waits_past_the_slack():
    import time

    async def main():
        release = asyncio.Event()
        seen: list[list[float]] = []

        async def process(items):
            seen.append(list(items))
            if len(seen) == 1:
                await release.wait()  # hold the first batch in flight
            return items

        far = 3600.0
        b = MicroBatcher(process, max_batch=4, max_wait_s=0, max_queue=100, max_in_flight=2,
                         adaptive_wait_s=far, deadline_of=lambda d: d)  # fmt: skip
        for i in range(50):  # the load it saw: arrivals 1 s apart, batches of 100 s
            b.window.arrived(time.monotonic() - 50 + i)
            b.window.served(100.0, 1)
        b.start()
        first = asyncio.ensure_future(b.submit(time.monotonic() + far))
        while not seen:
            await asyncio.sleep(0)
        # one batch in flight, full load: the next waits until it is full (4), not for the ceiling
        full = [asyncio.ensure_future(b.submit(time.monotonic() + far)) for _ in range(4)]
        await asyncio.wait_for(asyncio.gather(*full), 30)
        assert [len(x) for x in seen] == [1, 4]
        # a request whose deadline leaves no slack goes alone at once, although the window is open
        urgent = time.monotonic() + 0.5
        assert await asyncio.wait_for(b.submit(urgent), 30) == urgent
        assert [len(x) for x in seen] == [1, 4, 1]
        release.set()
        await first
        await b.stop()

    asyncio.run(main())
