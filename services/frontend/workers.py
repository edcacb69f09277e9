"""``frontend serve --workers N``: N frontend processes behind one port.

One frontend process serves on one core at most: its event loop is one Python thread, and on a
busy frontend every call waits in that loop behind the others before its handler runs (a refusal
too: docs/overload.md, "the floor"). Workers are separate processes bound to the same gRPC port
(and REST port) with SO_REUSEPORT; the kernel hands each new connection to one of them by a hash
of its addresses, so load spreads across connections, not calls: a caller opens several
(docs/workers.md).

This parent only supervises. It reserves the ports (a bound, never listening socket: no
connection reaches it, and ``--port 0`` gets one number for all), starts each worker
(``services.frontend.main.serve`` in a spawned interpreter, id ``<id>-w<i>``, metrics port
``<port>+i``), relays their status lines (``READY`` once every worker is ready), restarts a worker
that dies after the start (backoff doubling from 0.5 s while it keeps dying young), and on
SIGTERM or SIGINT passes SIGTERM on and waits for every worker's lame duck and drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from services.core.config import FrontendConfig

log = logging.getLogger("shardrec.frontend.workers")
_POLL_S = 0.2  # the supervisor's wait for a status line, an exit or a signal
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
_YOUNG_S = 30.0  # a worker that dies younger than this doubles the next restart's delay
_STOP_MARGIN_S = 15.0  # beyond lame duck + grace before a worker that does not exit is killed


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and never listening: it holds the
    port number (``port`` 0: a free one) for the workers, which bind it too, and takes no
    connection itself."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_config(config: FrontendConfig, index: int, port: int, http_port: int | None) -> FrontendConfig:
    """Worker ``index``'s config: the shared ports, its own id and metrics port."""
    obs = config.observability
    metrics_port = obs.metrics_port + index if obs.metrics_port else obs.metrics_port
    return dataclasses.replace(
        config,
        frontend_id=f"{config.frontend_id}-w{index}",
        port=port,
        http_port=http_port,
        observability=dataclasses.replace(obs, metrics_port=metrics_port),
    )


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux), so a killed supervisor leaves no
    orphaned worker holding the port."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(name).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_main(config: FrontendConfig, status) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """A worker: one frontend whose status lines go to the supervisor."""
    _die_with_parent()
    from services.core.logs import setup_logging
    from services.frontend.main import serve

    setup_logging("frontend", config.frontend_id, fmt=config.observability.log_format, level=config.observability.log_level)
    raise SystemExit(asyncio.run(serve(config, announce=status.send)))


@dataclasses.dataclass
class _Worker:
    index: int
    config: FrontendConfig
    process: multiprocessing.process.BaseProcess | None = None
    status: multiprocessing.connection.Connection | None = None
    started_at: float = 0.0
    ready: bool = False
    next_start: float = 0.0
    backoff_s: float = _FIRST_BACKOFF_S

    def start(self, ctx) -> None:  # noqa: ANN001 - a multiprocessing context
        reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(self.config, writer), name=self.config.frontend_id)
        self.process.start()
        writer.close()
        self.status, self.started_at, self.ready = reader, time.monotonic(), False

    def reap(self) -> int | None:
        """The exit code once the process has ended (its status pipe closed), else None."""
        assert self.process is not None and self.status is not None
        self.process.join()
        self.status.close()
        code, self.process, self.status = self.process.exitcode, None, None
        return code


class Supervisor:
    """The parent of ``--workers`` frontends (module docstring)."""

    def __init__(self, config: FrontendConfig, announce: Callable[[str], None]) -> None:
        self.config = config
        self.announce = announce
        self.stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._announced: set[str] = set()
        self._ready_line = ""

    def run(self) -> int:
        cfg = self.config
        with ExitStack() as held:
            grpc_sock = held.enter_context(reserve_port(cfg.host, cfg.port))
            http_port = None
            if cfg.http_port is not None:
                http_port = held.enter_context(reserve_port(cfg.host, cfg.http_port)).getsockname()[1]
            port = grpc_sock.getsockname()[1]
            self._workers = [_Worker(i, worker_config(cfg, i, port, http_port)) for i in range(cfg.workers)]
            log.info("frontend %s: %d workers on port %d", cfg.frontend_id, cfg.workers, port)
            for w in self._workers:
                w.start(self._ctx)
            try:
                failed = self._supervise()
            finally:
                codes = self._stop_all()
        return 1 if failed or any(c != 0 for c in codes) else 0

    def _supervise(self) -> bool:
        """Relay status lines and restart dead workers until asked to stop; True when a worker
        failed before every worker was ready (the start failed)."""
        while not self.stop.is_set():
            live = {w.status: w for w in self._workers if w.status is not None}
            for conn in multiprocessing.connection.wait(list(live), timeout=_POLL_S):
                w = live[conn]
                try:
                    self._line(w, conn.recv())
                except (EOFError, OSError):  # the worker ended
                    code = w.reap()
                    if not self._ready_line:
                        log.error("worker %d exited with code %s before every worker was ready", w.index, code)
                        return True
                    self._schedule_restart(w, code)
            now = time.monotonic()
            for w in self._workers:
                if w.process is None and now >= w.next_start:
                    log.info("restarting worker %d", w.index)
                    w.start(self._ctx)
        return False

    def _line(self, w: _Worker, line: str) -> None:
        kind = line.split(" ", 1)[0]
        if kind == "READY":
            w.ready = True
            if not self._ready_line and all(x.ready for x in self._workers):
                self._ready_line = line
                self.announce(line)
        elif kind == "METRICS" or kind not in self._announced:  # each worker's metrics; the shared ports once
            self._announced.add(kind)
            self.announce(line)

    def _schedule_restart(self, w: _Worker, code: int | None) -> None:
        young = time.monotonic() - w.started_at < _YOUNG_S
        w.backoff_s = min(w.backoff_s * 2, _MAX_BACKOFF_S) if young else _FIRST_BACKOFF_S
        w.next_start = time.monotonic() + w.backoff_s
        log.warning("worker %d exited with code %s; restarting in %.1fs", w.index, code, w.backoff_s)

    def _stop_all(self) -> list[int | None]:
        """SIGTERM every worker, wait for each (lame duck + grace + a margin), kill what is left."""
        running = [w for w in self._workers if w.process is not None]
        for w in running:
            if w.process.pid is not None:
                try:
                    os.kill(w.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.config.lame_duck_s + self.config.grace_s + _STOP_MARGIN_S
        for w in running:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("worker %d did not stop in time: killed", w.index)
                w.process.kill()
        return [w.reap() for w in running]


def run_workers(config: FrontendConfig, announce: Callable[[str], None] | None = None) -> int:
    """Run ``config.workers`` frontends behind one port until SIGTERM or SIGINT (module docstring)."""
    supervisor = Supervisor(config, announce or (lambda line: print(line, flush=True)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop.set())
    return supervisor.run()
