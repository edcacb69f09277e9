"""Files re-read when they change, without a restart: tokens, the cluster token, certificates
(docs/security.md, "Rotation").

``WatchedFiles.get()`` stats its files at most once per ``poll_s`` (a timer driven by the
callers: the request path or the TLS handshake), and re-reads and re-parses them when a file's
mtime, size or inode changed. A change that does not parse (a half-written file, a bad token
line) is logged and ignored: the last good value keeps serving, and the next change is tried
again. Replace files atomically (write a temporary file, then rename) to avoid reading one half
written. Thread-safe; no env reads, no grpc.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from services.core.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


class WatchedFiles(Generic[T]):
    """``parse(contents)`` of ``paths`` (their bytes, in order), kept current.

    The first read happens here: a missing or unparsable file is a ConfigError naming it (fail
    fast at start). ``generation`` counts the values parsed (1 after construction)."""

    def __init__(
        self, paths: Sequence[str], parse: Callable[[list[bytes]], T], *, poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.paths = tuple(paths)
        self._parse = parse
        self._poll_s = poll_s
        self._clock = clock
        self._lock = threading.Lock()
        self.generation = 0
        try:
            self._stamps = [_stamp(p) for p in self.paths]
            self._value = parse([_read(p) for p in self.paths])
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {', '.join(self.paths)}: {e}") from e
        self.generation = 1
        self._checked = clock()

    def get(self) -> T:
        """The current value (re-read first when a file changed and ``poll_s`` has passed)."""
        now = self._clock()
        if now - self._checked >= self._poll_s:
            self.refresh(now)
        return self._value

    def refresh(self, now: float | None = None) -> bool:
        """Stat the files now; re-read on a change. Returns whether the value changed."""
        with self._lock:
            self._checked = self._clock() if now is None else now
            try:
                stamps = [_stamp(p) for p in self.paths]
            except OSError as e:
                log.warning("cannot stat %s (%s); keeping the last good value", ", ".join(self.paths), e)
                return False
            if stamps == self._stamps:
                return False
            try:
                value = self._parse([_read(p) for p in self.paths])
            except (OSError, ValueError, ConfigError) as e:
                self._stamps = stamps  # tried once; the next change is tried again
                log.error("%s changed but cannot be used (%s); keeping the last good value", ", ".join(self.paths), e)
                return False
            self._stamps = stamps
            self._value = value
            self.generation += 1
            log.info("re-read %s (generation %d)", ", ".join(self.paths), self.generation)
            return True


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
