"""``cancel_pending`` (the fan-out's and the hedger's clean-up): losers are cancelled, and a task
that failed, before or while being cancelled, is never reported by asyncio as "Task exception
was never retrieved" (seen under overload, when a batch gave up on shard calls that then failed)."""

from __future__ import annotations

import asyncio
import gc

from services.frontend.lookup.grpc.calls import cancel_pending


async def _fail_now() -> None:
    raise RuntimeError("shard call failed")


async def _fail_when_cancelled() -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise RuntimeError("failed while being cancelled") from None


async def _ok() -> int:
    return 1


def test_cancelled_and_failed_losers_are_not_reported_as_unretrieved() -> None:
    reported: list[dict] = []

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        failed, slow_failer, ok, pending = (asyncio.ensure_future(c) for c in (_fail_now(), _fail_when_cancelled(), _ok(), asyncio.sleep(10)))
        await asyncio.sleep(0.01)  # failed and ok finish; the other two wait
        n = cancel_pending([failed, slow_failer, ok, pending])
        await asyncio.sleep(0.01)  # the cancellations land
        assert slow_failer.done() and pending.cancelled() and ok.result() == 1
        return n

    assert asyncio.run(main()) == 2  # the two not done were cancelled
    gc.collect()  # an unretrieved exception is reported when its task is collected
    assert [c for c in reported if "never retrieved" in str(c.get("message"))] == []


def test_without_it_asyncio_reports_the_failure() -> None:
    """The check above can fail: a task that failed and that nobody looked at is reported (the
    fan-out's clean-up used to skip tasks already done, such as a second failed node call)."""
    reported: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        task = asyncio.ensure_future(_fail_now())
        await asyncio.sleep(0.01)
        del task
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert any("never retrieved" in str(c.get("message")) for c in reported)
