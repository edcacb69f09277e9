"""gRPC server bootstrap: message limits, health, reflection, port binding (TLS, IPv6), the
authentication interceptor (``services.core.rpc.auth``), graceful stop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core.auth import AccessPolicy
from services.core.hostport import join_host_port
from services.core.tls import TlsMaterial

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The health name of liveness: SERVING from start until stop, whatever the process's readiness
# ("" and each service name; a frontend's follow what serving needs). docs/failure-modes.md.
LIVENESS = "shardrec.liveness"


def channel_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    """Options every shardrec server and channel uses (message caps set deliberately;
    ``max_receive_bytes`` when what may arrive is smaller than what may be sent)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes if max_receive_bytes is None else max_receive_bytes),
        ("grpc.so_reuseport", 0),
    ]


def _register(server, add_servicers, service_names, health_servicer) -> tuple[str, ...]:
    """Servicers, health and reflection on ``server`` (sync or asyncio alike)."""
    for add in add_servicers:
        add(server)
    names = tuple(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return names


@dataclass(frozen=True)
class Security:
    """What a server checks: ``policy`` (an interceptor is installed only when it checks
    something), ``tls`` (TLS on the port when set; mTLS with ``require_client_auth``)."""

    policy: AccessPolicy | None = None
    tls: TlsMaterial | None = None
    require_client_auth: bool = False

    def interceptors(self, aio: bool) -> list:
        if self.policy is None or not self.policy.enabled:
            return []
        from services.core.rpc.auth import AioAuthInterceptor, AuthInterceptor

        return [AioAuthInterceptor(self.policy) if aio else AuthInterceptor(self.policy)]


NO_SECURITY = Security()


def _bind(server, host: str, port: int, security: Security = NO_SECURITY) -> int:
    """Bind ``host:port`` (an IPv6 host such as ``::`` is bracketed), with TLS when asked."""
    address = join_host_port(host, port)
    if security.tls is not None:
        bound = server.add_secure_port(address, security.tls.server_credentials(require_client_auth=security.require_client_auth))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    return bound


@dataclass
class SyncServer:
    """A started thread-pool gRPC server with its bound port and health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]

    def set_serving(self, serving: bool) -> None:
        """Liveness and readiness together (start, stop)."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names, LIVENESS):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then refuse new calls and let in-flight ones finish within ``grace_s``."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()


def start_sync_server(
    host: str,
    port: int,
    *,
    threads: int,
    max_message_bytes: int,
    add_servicers: Iterable[Callable[[grpc.Server], None]],
    service_names: Iterable[str],
    max_receive_bytes: int | None = None,
    security: Security = NO_SECURITY,
) -> SyncServer:
    """Bind ``host:port`` (0 = any free port), register servicers, health (NOT_SERVING until
    ``set_serving(True)``) and reflection, and start. A request over ``max_receive_bytes``
    (default ``max_message_bytes``) is refused by gRPC itself, RESOURCE_EXHAUSTED."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=channel_options(max_message_bytes, max_receive_bytes),
        interceptors=security.interceptors(aio=False),
    )
    health_servicer = health.HealthServicer()
    names = _register(server, add_servicers, service_names, health_servicer)
    bound = _bind(server, host, port, security)
    server.start()
    s = SyncServer(server, bound, health_servicer, names)
    s.set_serving(False)
    return s


@dataclass
class AioServer:
    """A started grpc.aio server with its bound port and health servicer (event loop only)."""

    server: grpc.aio.Server
    port: int
    health: "aio_health.HealthServicer"
    service_names: tuple[str, ...]
    statuses: dict[str, bool] = field(default_factory=dict)  # the health last set per name (SERVING or not)

    async def set_serving(self, serving: bool) -> None:
        """Liveness and readiness together (start, stop)."""
        await self.set_health(("", *self.service_names, LIVENESS), serving)

    async def set_health(self, names: Iterable[str], serving: bool) -> None:
        """SERVING or NOT_SERVING for the health ``names`` only (e.g. readiness without liveness)."""
        status = SERVING if serving else NOT_SERVING
        for name in names:
            await self.health.set(name, status)
            self.statuses[name] = serving

    def is_serving(self, name: str = "") -> bool:
        """Whether health ``name`` was last set SERVING (what a health check of it answers)."""
        return self.statuses.get(name, False)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_aio_server(
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    add_servicers: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    max_receive_bytes: int | None = None,
    security: Security = NO_SECURITY,
) -> AioServer:
    """The asyncio twin of ``start_sync_server`` (health NOT_SERVING until ``set_serving``)."""
    from grpc_health.v1 import _async as aio_health

    server = grpc.aio.server(options=channel_options(max_message_bytes, max_receive_bytes), interceptors=security.interceptors(aio=True))
    health_servicer = aio_health.HealthServicer()
    names = _register(server, add_servicers, service_names, health_servicer)
    bound = _bind(server, host, port, security)
    await server.start()
    s = AioServer(server, bound, health_servicer, names)
    await s.set_serving(False)
    return s


def tune_allocator(keep_bytes: int = 256 * 1024 * 1024) -> bool:
    """Keep big freed buffers in the heap instead of returning them to the kernel (glibc only).

    Every Lookup allocates megabytes (request bytes, pooled outputs, the serialized response).
    With glibc's defaults those blocks are mmap'd and unmapped per call, so each call takes
    thousands of page faults (measured: ~2,000 per 512x26x20 Lookup, ~70 after this). Returns
    whether the settings were applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return bool(
        mallopt(M_MMAP_THRESHOLD, keep_bytes) and mallopt(M_TRIM_THRESHOLD, 4 * keep_bytes) and mallopt(M_TOP_PAD, 64 * 1024 * 1024)
    )
