"""A lagging ZooKeeper view for one client process: a TCP hop in front of the real server.

``NotificationLag`` forwards every byte between its clients and ZooKeeper, except that while a
``hold()`` is in force it keeps back the watch notifications the server sends (replies with
xid -1) and delivers them, in order, when the hold ends. Requests, replies and pings pass, so
the session stays healthy; the client just learns of changes late, as a client connected to a
ZooKeeper follower that lags the leader does. Nothing about ZooKeeper is faked: this is fault
injection on the network path, like SIGSTOP or a server restart.

Wire format (ZooKeeper client protocol): every message is a 4-byte big-endian length and a
payload; the server's first message on a connection is the connect response, every later one
starts with a reply header whose first field is the xid (int32; -1 = watch notification, -2 =
ping reply).

Threads: one acceptor and two pumps per connection, all daemons; ``hold`` / ``release`` /
``close`` from the test thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

_NOTIFICATION_XID = -1


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket, lag: "NotificationLag") -> None:
        self.client, self.upstream, self.lag = client, upstream, lag
        self.lock = threading.Lock()
        self.pending: list[bytes] = []
        threading.Thread(target=self._client_to_server, daemon=True).start()
        threading.Thread(target=self._server_to_client, daemon=True).start()

    def _client_to_server(self) -> None:
        try:
            while data := self.client.recv(65536):
                self.upstream.sendall(data)
        except OSError:
            pass
        self.close()

    def _server_to_client(self) -> None:
        first = True
        try:
            while True:
                header = _read_exactly(self.upstream, 4)
                frame = header + _read_exactly(self.upstream, struct.unpack(">i", header)[0])
                notification = not first and struct.unpack(">i", frame[4:8])[0] == _NOTIFICATION_XID
                first = False
                with self.lock:
                    if self.lag.holding:
                        if notification:
                            self.pending.append(frame)
                        else:  # replies and pings pass: the session stays healthy
                            self.client.sendall(frame)
                        continue
                    pending, self.pending = self.pending, []  # released meanwhile: keep the order
                    for f in (*pending, frame):
                        self.client.sendall(f)
        except (OSError, EOFError):
            pass
        self.close()

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
            try:
                for frame in pending:
                    self.client.sendall(frame)
            except OSError:
                pass

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return bytes(out)


class NotificationLag:
    """Listen on a free loopback port (``hosts``: give it to the client as its ZooKeeper) and
    forward to ``upstream_hosts`` ("host:port")."""

    def __init__(self, upstream_hosts: str) -> None:
        host, _, port = upstream_hosts.partition(",")[0].rpartition(":")
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.hosts = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.holding = False
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self._upstream)
            except OSError:
                return
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections.append(_Connection(client, upstream, self))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep back watch notifications inside the block; deliver them when it ends."""
        self.holding = True
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        self.holding = False
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            c.flush()

    def close(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for c in self._connections:
                c.close()
