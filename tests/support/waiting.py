"""Waiting on conditions with a deadline: the ONLY way tests wait for something.

Never ``time.sleep(x)`` to "let something happen": poll the condition that proves it happened,
with a deadline, so a fast machine is fast and a slow one fails with a message that says what
never became true.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.01) -> T:
    """Call ``predicate()`` until it returns a truthy value; return that value.

    An exception raised by ``predicate`` counts as "not yet" (so ``lambda: zk.get(path)`` may
    raise NoNodeError while the node does not exist). When ``timeout_s`` passes, raise
    AssertionError naming ``what``, the last value returned and the last exception raised.
    The predicate runs at least once, even with ``timeout_s <= 0``. Called from the test thread.
    """
    deadline = time.monotonic() + timeout_s
    attempts = 0
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        attempts += 1
        try:
            value = predicate()
        except Exception as e:  # "not yet"; reported if it never succeeds
            last_error = e
        else:
            if value:
                return value
            last_value, last_error = value, None
        if time.monotonic() >= deadline:
            detail = f"last exception: {last_error!r}" if last_error is not None else f"last value: {last_value!r}"
            raise AssertionError(f"timed out after {timeout_s:.2f}s ({attempts} attempts) waiting for {what}; {detail}")
        time.sleep(interval_s)


async def until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.01) -> None:
    """``wait_for`` for a test running on an event loop: poll ``predicate()`` (no exceptions
    swallowed) without blocking the loop, AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        await asyncio.sleep(interval_s)  # step of the polling loop
