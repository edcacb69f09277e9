"""Console output of the local cluster: short progress lines (``starting ZooKeeper ... ok 0.4s``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import IO, Iterator


class Progress:
    """Short progress lines: ``step("starting ZooKeeper on ...")`` prints ``... ok 0.4s``.

    A step prints its head, then ``ok <elapsed>s[ detail]`` on the same line, or on a line of
    its own when other lines were printed meanwhile; ``FAILED after <elapsed>s`` on error.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._open = False  # a step head is printed without its end

    def line(self, text: str = "") -> None:
        if self._open:
            self.out.write("\n")
            self._open = False
        self.out.write(text + "\n")
        self.out.flush()

    @contextmanager
    def step(self, head: str) -> Iterator[dict[str, str]]:
        """Yields a dict; set ``["detail"]`` to append text after ``ok``."""
        if self._open:
            self.out.write("\n")
        self.out.write(f"{head} ... ")
        self.out.flush()
        self._open = True
        note: dict[str, str] = {}
        t0 = time.monotonic()
        try:
            yield note
        except KeyboardInterrupt:
            self._end(f"interrupted after {time.monotonic() - t0:.1f}s")
            raise
        except BaseException:
            self._end(f"FAILED after {time.monotonic() - t0:.1f}s")
            raise
        detail = note.get("detail", "")
        self._end(f"ok {time.monotonic() - t0:.1f}s" + (f" {detail}" if detail else ""))

    def _end(self, text: str) -> None:
        if not self._open:
            text = f"  ... {text}"
        self.out.write(text + "\n")
        self.out.flush()
        self._open = False
