"""gRPC health for tests: one Check, and ``HealthWatch``, which follows the health of several
processes through their Watch streams (every status a server sends, so even a brief flip is
seen), for tests that assert a fault changed no readiness.

Used from the test thread; each stream is read on a thread of its own, which only appends.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.clients import make_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "", timeout_s: float = 5.0) -> int:
    """The status ``address`` answers for ``service`` (names in docs/health.md)."""
    with make_channel(address, aio=False) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status


class Seen(NamedTuple):
    name: str  # the watched process, as the test named it
    status: int
    at: float  # time.monotonic()


class HealthWatch:
    """``targets``: name -> (address, service). Each stream's statuses go to ``seen``; a stream
    that ends with an error is recorded in ``errors``. A context manager: streams start on entry
    and are cancelled on exit."""

    def __init__(self, targets: dict[str, tuple[str, str]]) -> None:
        self.targets = targets
        self.seen: list[Seen] = []
        self.errors: list[tuple[str, grpc.RpcError]] = []
        self._channels: list[grpc.Channel] = []
        self._calls: list = []
        self._threads: list[threading.Thread] = []
        self._closing = False

    def _follow(self, name: str, stream) -> None:  # noqa: ANN001
        try:
            for reply in stream:
                self.seen.append(Seen(name, reply.status, time.monotonic()))
        except grpc.RpcError as e:
            if not self._closing:
                self.errors.append((name, e))

    def statuses(self, name: str) -> list[int]:
        return [s.status for s in list(self.seen) if s.name == name]

    def not_serving(self) -> list[Seen]:
        return [s for s in list(self.seen) if s.status != SERVING]

    def __enter__(self) -> "HealthWatch":
        for name, (address, service) in self.targets.items():
            channel = make_channel(address, aio=False)
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
            self._channels.append(channel)
            self._calls.append(stream)
            thread = threading.Thread(target=self._follow, args=(name, stream), name=f"health-watch {name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            thread.join(5)
        for channel in self._channels:
            channel.close()
