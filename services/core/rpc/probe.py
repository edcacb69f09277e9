"""Is the process a member znode names still the one answering at its address?

A restarted shard or frontend finds its id's znode still held by its predecessor's session
(kill -9: the session lives until it times out). It takes the znode over at once when the
address recorded there does not answer a health check within a short timeout, or answers as
another process (its ``instance_id`` differs); only a process that answers as itself keeps it
(docs/zookeeper.md, "Sessions, expiry and outages").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from services.core.clients import make_channel
from services.core.discovery.records import MemberRecord, RecordError
from services.core.rpc.server import INSTANCE_ID_KEY, LIVENESS

if TYPE_CHECKING:
    from services.core.tls import TlsMaterial

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def answering_instance(address: str, timeout_s: float = PROBE_TIMEOUT_S, credentials=None) -> str | None:  # noqa: ANN001
    """The instance id of the process answering gRPC health at ``address`` ("" when it names
    none: an older process, or not a shardrec server), or None when nothing answers within
    ``timeout_s`` (refused, unreachable, or frozen). ``credentials``: TLS channel credentials
    when the cluster's ports are TLS (the prober's own, so an mTLS port lets it in). Blocks;
    any thread but an event loop's."""
    channel = make_channel(address, aio=False, credentials=credentials)
    try:
        return instance_on(channel, timeout_s)
    finally:
        channel.close()


def instance_on(channel: grpc.Channel, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """``answering_instance`` over an open blocking channel: the process at the other end of its
    connection (with several processes on one port, as frontend workers are, the one this
    connection reached)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        check = health_pb2_grpc.HealthStub(channel).Check
        _reply, call = check.with_call(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=timeout_s)
        metadata = call.trailing_metadata()
    except grpc.RpcError as e:
        if e.code() in _NO_ANSWER:
            return None
        metadata = e.trailing_metadata()  # it answered, with an error: still a process there
    return next((value for key, value in metadata or () if key == INSTANCE_ID_KEY), "")


def answers_as(record: MemberRecord, timeout_s: float = PROBE_TIMEOUT_S, credentials=None) -> bool:  # noqa: ANN001
    """Whether the process that wrote ``record`` still answers at its address as itself. A
    record with no address cannot be checked: True (its session decides)."""
    if not record.address:
        return True
    instance = answering_instance(record.address, timeout_s, credentials)
    if instance is None:
        log.info("%s does not answer within %.1fs", record.address, timeout_s)
        return False
    if instance != record.instance_id:
        log.info("%s answers as instance %r, not %r", record.address, instance, record.instance_id)
        return False
    return True


def holder_probe(
    parse: Callable[[bytes], MemberRecord], timeout_s: float = PROBE_TIMEOUT_S, tls: "TlsMaterial | None" = None
) -> Callable[[bytes], bool]:
    """``probe(data)`` for ``NodeRegistration``: does the process whose znode holds ``data``
    (parsed by ``parse``) still answer as itself? Data it cannot parse: True (unknown). With
    ``tls`` (the prober's TLS files: the cluster's ports are TLS) it dials over TLS with its
    current certificate."""

    def probe(data: bytes) -> bool:
        try:
            record = parse(data)
        except RecordError as e:
            log.warning("cannot probe the holder of a malformed znode: %s", e)
            return True
        return answers_as(record, timeout_s, None if tls is None else tls.channel_credentials())

    return probe
