"""Log lines of every shardrec process, text or JSON, one line each; the log keys are spelled
here and nowhere else (docs/observability.md, "Logs").

Every line carries the time, level, process role, node id and logger; a line written while a
request is being served also carries its request id and trace id (``request_scope`` sets them
in a context variable, so each asyncio task and each RPC thread sees its own). Failed requests
get one line each through ``FailureLog``, rate-limited per status code so a shed storm cannot
flood the log (the counts stay exact in the metrics).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator

# The log keys (JSON field names; the text format shows the same values).
TIME, LEVEL, ROLE, NODE, LOGGER, MESSAGE = "time", "level", "role", "node", "logger", "message"
REQUEST_ID, TRACE_ID, STATUS, EXCEPTION = "request_id", "trace_id", "status", "exception"
LOG_FORMATS = ("text", "json")

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardrec_request_id", default=None)


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


def current_trace_id(context=None) -> str | None:
    """The trace id (32 hex digits) of the span current in this context (or in the
    opentelemetry ``context`` given), or None."""
    from opentelemetry import trace

    ctx = trace.get_current_span(context).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextlib.contextmanager
def request_scope(request_id: str | None) -> Iterator[None]:
    """Lines logged inside carry ``request_id`` (this task or thread only)."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def ids_suffix(request_id: str | None = None, trace_id: str | None = None) -> str:
    """`` (request id R, trace T)`` for an error message: the ids given, else the current
    context's ("" when there is neither)."""
    parts = []
    rid = request_id or _REQUEST_ID.get()
    if rid:
        parts.append(f"request id {rid}")
    tid = trace_id or current_trace_id()
    if tid:
        parts.append(f"trace {tid}")
    return f" ({', '.join(parts)})" if parts else ""


def with_ids(exc: BaseException) -> BaseException:
    """A copy of ``exc`` whose message ends with ``ids_suffix()`` (``exc`` itself when there
    are no ids): one exception object may answer every request of a batch, so it is never
    changed in place."""
    suffix = ids_suffix()
    if not suffix:
        return exc
    out = copy.copy(exc)
    out.args = (f"{exc}{suffix}",)
    return out


class _Context(logging.Filter):
    """Adds role, node, request id and trace id to every record."""

    def __init__(self, role: str, node: str) -> None:
        super().__init__()
        self.role, self.node = role, node

    def filter(self, record: logging.LogRecord) -> bool:
        record.role, record.node = self.role, self.node
        if not hasattr(record, REQUEST_ID):
            record.request_id = _REQUEST_ID.get()
        if not hasattr(record, TRACE_ID):
            record.trace_id = current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the keys above; ``request_id``, ``trace_id`` and ``status``
    only when set, ``exception`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            TIME: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            LEVEL: record.levelname,
            ROLE: getattr(record, "role", ""),
            NODE: getattr(record, "node", ""),
            LOGGER: record.name,
            MESSAGE: record.getMessage(),
        }
        for key in (REQUEST_ID, TRACE_ID, STATUS):
            value = getattr(record, key, None)
            if value:
                doc[key] = value
        if record.exc_info:
            doc[EXCEPTION] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``TIME LEVEL role/node logger: message [request_id=R trace_id=T]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(role)s/%(node)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in (REQUEST_ID, TRACE_ID, STATUS) if getattr(record, k, None))
        return f"{line} [{extra}]" if extra else line


def setup_logging(role: str, node: str, *, fmt: str = "text", level: str = "INFO", stream=None) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr) in ``fmt``; every line gets ``role`` and
    ``node``. Returns the handler (tests remove it)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_Context(role, node))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


# Status codes that are the server's fault (logged at WARNING); the rest are the caller's or a
# refusal for load (INFO).
SERVER_FAULTS = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"})


class FailureLog:
    """One line per failed request, at most ``rate_per_s`` lines a second per status code
    (bursts of ``burst``); lines over the rate are counted and the next line written for that
    code says how many were left out. Thread-safe."""

    def __init__(self, logger: logging.Logger, *, rate_per_s: float = 5.0, burst: float = 20.0, clock=time.monotonic) -> None:
        self._log = logger
        self._rate, self._burst, self._clock = rate_per_s, burst, clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, code: str, what: str, message: str) -> bool:
        """Log ``what failed with CODE: message`` unless over the rate; True when logged."""
        now = self._clock()
        with self._lock:
            tokens = min(self._burst, self._tokens.get(code, self._burst) + (now - self._at.get(code, now)) * self._rate)
            self._at[code] = now
            if tokens < 1.0:
                self._tokens[code] = tokens
                self._suppressed[code] = self._suppressed.get(code, 0) + 1
                return False
            self._tokens[code] = tokens - 1.0
            left_out = self._suppressed.pop(code, 0)
        level = logging.WARNING if code in SERVER_FAULTS else logging.INFO
        more = f" ({left_out} more {code} lines left out by the rate limit)" if left_out else ""
        self._log.log(level, "%s failed with %s: %s%s", what, code, message, more, extra={STATUS: code})
        return True
