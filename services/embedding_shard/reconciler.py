"""The shard's one writer thread: every change to the node's TableStore happens here.

ZooKeeper publishes desired state (STYLE #2); watches only record it and ``wake`` this thread,
which runs its steps in turn until the node stops:

- ``VersionManager.reconcile`` (``version_manager.py``): load, promote and drop model versions;
- ``PartitionManager.reconcile`` (``partition_manager.py``): load the partitions the shard
  maps give the node (one per pass, so a delta published during a long move is not held up
  behind it) and drop the ones it no longer owns after the drain period;
- ``LoadMeter.tick`` (``meter.py``): sample the per-partition lookup counters for the
  node's znode, every few seconds.

Each step returns how long the thread may sleep before it is due again (None: until woken;
0: at once). One thread means the store never sees two writers, and a partition loaded for a
move is read at exactly the versions the store holds when it is added.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Step = Callable[[], "float | None"]
# After a step raised (a bug, not a refusal), retry no sooner than this.
_ERROR_RETRY_S = 1.0


class Reconciler:
    """``run(steps)`` runs the steps on the calling thread until ``stop`` is set. ``wake`` (any
    thread) makes the next pass start at once; a wake during a pass is not lost."""

    def __init__(self, *, stop: threading.Event) -> None:
        self._stop = stop
        self._cond = threading.Condition()
        self._woken = False

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def run(self, steps: Sequence[Step]) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._woken = False
            timeout: float | None = None
            for step in steps:
                if self._stop.is_set():
                    return
                try:
                    due = step()
                except Exception:  # a bug must not kill the node's only writer: log and go on
                    log.exception("reconcile step %s failed", getattr(step, "__qualname__", step))
                    due = _ERROR_RETRY_S
                if due is not None:
                    timeout = due if timeout is None else min(timeout, due)
            with self._cond:
                if not self._woken and not self._stop.is_set():
                    self._cond.wait(timeout)
