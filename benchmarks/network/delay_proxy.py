"""A TCP relay that adds a fixed delay in each direction: the latency half of the emulated data
centre network (docs/deploy.md, "The emulated-network benchmark"; this kernel has
no ``netem``). Its own process, so its CPU is measured apart from the system under test.

    python -m benchmarks.network.delay_proxy --delay-ms 0.25 127.0.0.2:7001=127.0.0.1:7001 ...

Prints ``READY`` and the bound addresses (a listen port 0 is chosen by the kernel) once every
listener is bound. Each accepted connection gets a connection to
its target; each direction has a reader thread (``recv``, stamp, queue) and a writer thread
(sleep until stamp + delay, ``sendall``), so bytes are delayed but not rate-limited: a chunk
read while earlier ones wait is forwarded ``delay`` after its own arrival. Threads, not an
event loop: ``time.sleep`` wakes within ~0.1 ms, where asyncio's epoll timers round up to 1 ms.
At most ``--max-buffer-bytes`` wait per direction (the reader stops reading meanwhile). Stops
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from services.core.hostport import join_host_port, split_host_port

CHUNK_BYTES = 256 * 1024


class _Pipe:
    """One direction of one connection: bytes read from ``src`` reach ``dst`` ``delay_s`` later."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, max_buffer_bytes: int) -> None:
        self.src, self.dst, self.delay_s = src, dst, delay_s
        self.max_buffer_bytes = max_buffer_bytes
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.cond = threading.Condition()
        self.eof = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK_BYTES)
                if not data:
                    break
                with self.cond:
                    while self.buffered >= self.max_buffer_bytes:
                        self.cond.wait()
                    self.queue.append((time.monotonic() + self.delay_s, data))
                    self.buffered += len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait()
                    if not self.queue:
                        break
                    due, data = self.queue.popleft()
                    self.buffered -= len(data)
                    self.cond.notify_all()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (self.src, self.dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _serve(listener: socket.socket, target: tuple[str, int], delay_s: float, max_buffer_bytes: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(target)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Pipe(client, upstream, delay_s, max_buffer_bytes).start()
        _Pipe(upstream, client, delay_s, max_buffer_bytes).start()


def _tight_timers() -> None:
    """Timer slack 1 ns instead of Linux's 50 us, so a sleep ends when asked (PR_SET_TIMERSLACK
    is per thread and inherited by the threads started afterwards)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP relay with a fixed delay per direction")
    parser.add_argument("--delay-ms", type=float, required=True, help="added to each direction (one way)")
    parser.add_argument("--max-buffer-bytes", type=int, default=64 * 1024 * 1024, help="waiting bytes per direction at most")
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET", help="host:port=host:port ([v6]:port for IPv6)")
    args = parser.parse_args(argv)
    _tight_timers()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bound = []
    for route in args.routes:
        listen, _, target = route.partition("=")
        host, port = split_host_port(listen)
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
        bound.append(join_host_port(host, listener.getsockname()[1]))
        threading.Thread(target=_serve, args=(listener, split_host_port(target), args.delay_ms / 1e3, args.max_buffer_bytes),
                         daemon=True).start()  # fmt: skip
    print("READY", *bound, flush=True)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
