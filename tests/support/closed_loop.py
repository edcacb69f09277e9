"""A closed-loop Recommend client for end-to-end tests: a few threads, each sending one request
at a time until stopped, keeping every response (with its request, its start time and latency)
and every error, so a test can check each answer against the reference afterwards.

Used as a context manager from the test thread; the client threads only append.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import grpc
import numpy as np

from services._proto.shardrec.v1 import recommend_pb2_grpc


class Reply(NamedTuple):
    index: int  # into the requests
    response: object  # RecommendResponse
    start: float  # time.monotonic() when sent
    latency_s: float


class Failure(NamedTuple):
    index: int
    error: grpc.RpcError
    start: float
    latency_s: float


class ClosedLoop:
    """``clients`` threads over ``requests`` (client i sends i, i + clients, ...). ``seen[i]``
    is client i's replies in the order they came back; ``errors`` every failed call's error and
    ``failures`` the same with its request, start time and latency. ``options`` are the
    channels' options (e.g. a service config balancing over several frontends)."""

    def __init__(self, address: str, requests, clients: int = 2, timeout_s: float = 10.0, options=None) -> None:
        self.address = address
        self.options = list(options or [])
        self.requests = requests
        self.clients = clients
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self.seen: list[list[Reply]] = [[] for _ in range(clients)]
        self.errors: list[grpc.RpcError] = []
        self.error_starts: list[float] = []  # time.monotonic() each failed request was sent
        self.failures: list[Failure] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address, options=self.options) as ch:
            stub = recommend_pb2_grpc.RecommenderStub(ch)
            n = i
            while not self.stop.is_set():
                k = n % len(self.requests)
                t0 = time.monotonic()
                try:
                    resp = stub.Recommend(self.requests[k], timeout=self.timeout_s)
                    self.seen[i].append(Reply(k, resp, t0, time.monotonic() - t0))
                except grpc.RpcError as e:
                    self.error_starts.append(t0)
                    self.failures.append(Failure(k, e, t0, time.monotonic() - t0))
                    self.errors.append(e)
                n += self.clients

    def replies(self) -> list[Reply]:
        return [r for s in self.seen for r in list(s)]

    def versions(self) -> set[int]:
        return {r.response.version for r in self.replies()}

    def count(self, version: int) -> int:
        return sum(r.response.version == version for r in self.replies())

    def sent_between(self, t0: float, t1: float) -> list[Reply]:
        return [r for r in self.replies() if t0 <= r.start < t1]

    def p99_ms(self, t0: float, t1: float) -> tuple[float, int]:
        """p99 latency (ms) of the requests sent in ``[t0, t1)``, and how many there were."""
        lat = [r.latency_s for r in self.sent_between(t0, t1)]
        return (float(np.percentile(lat, 99)) * 1e3 if lat else float("nan")), len(lat)

    def __enter__(self) -> "ClosedLoop":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
