"""gRPC keepalive as the settings make it (``keepalive_options``): a client pinging an idle
connection keeps it with a server given the same ``keepalive_time_ms``, while a server left at
gRPC's defaults closes it for too many pings (why docs/configuration.md says to give shards and
frontends the same value)."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.clients import make_channel
from services.core.rpc.server import LIVENESS, keepalive_options, start_sync_server
from tests.support.waiting import wait_for

PING_S = 0.2


def _server(options):  # noqa: ANN001, ANN202
    return start_sync_server("127.0.0.1", 0, threads=2, max_message_bytes=1 << 20, add_servicers=[], service_names=[], options=options)


def _watched_channel(port: int) -> tuple[grpc.Channel, list]:
    """A pinging channel to ``port``, connected, and the connectivity states it went through."""
    channel = make_channel(f"127.0.0.1:{port}", aio=False, options=keepalive_options(PING_S, 1.0, server=False))
    states: list = []
    lock = threading.Lock()

    def seen(state):  # noqa: ANN001, ANN202
        with lock:
            states.append(state)

    channel.subscribe(seen, try_to_connect=True)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5)
    return channel, states


def test_same_keepalive_on_both_sides_keeps_the_idle_connection():
    matched = _server(keepalive_options(PING_S, 1.0, server=True))
    default = _server(())
    kept, kept_states = _watched_channel(matched.port)
    closed, closed_states = _watched_channel(default.port)
    try:
        ready = grpc.ChannelConnectivity.READY
        # The default server sends GOAWAY (too_many_pings) after a few of the client's pings.
        wait_for(lambda: closed_states and closed_states[-1] != ready, 10, "the default server to close the pinging connection")
        assert kept_states and kept_states[-1] == ready and kept_states.count(ready) == 1, kept_states  # never dropped
        reply = health_pb2_grpc.HealthStub(kept).Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        kept.close()
        closed.close()
        matched.stop(0)
        default.stop(0)
