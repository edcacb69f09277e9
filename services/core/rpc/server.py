"""gRPC server bootstrap: message limits, health, reflection, port binding (TLS, IPv6), the
authentication interceptor (``services.core.rpc.auth``), graceful stop.

Health (docs/health.md): ``""`` and the serving services carry readiness: NOT_SERVING until the
process's ``Readiness`` holds (``follow``), and first thing on a graceful stop. ``LIVENESS``
(and the ``live_names``, e.g. an admin service) is SERVING from start until the server stops:
the process answers. Every health Check answer carries the process's instance id in its
trailing metadata (``INSTANCE_ID_KEY``), so a probe tells the process recorded in a znode from
another one at the same address (``services.core.rpc.probe``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core.auth import AccessPolicy
from services.core.hostport import join_host_port
from services.core.rpc.readiness import Readiness
from services.core.tls import TlsMaterial

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "shardrec.liveness"  # the health name of liveness: SERVING while the process runs
INSTANCE_ID_KEY = "shardrec-instance-id"  # trailing metadata of every health Check answer


def new_instance_id() -> str:
    """A random token naming this process (its znode's ``instance_id``, its health answers)."""
    return secrets.token_hex(8)


def keepalive_options(time_s: float, timeout_s: float, *, server: bool) -> list[tuple[str, int]]:
    """gRPC keepalive (``KeepaliveConfig``; 0: gRPC's defaults). A client pings a connection
    idle ``time_s``, with or without calls; a server does too and accepts pings up to twice that
    often (a margin for timers), so give servers and their clients the same ``time_s``: a server
    that accepts fewer closes the connection (GOAWAY ``too_many_pings``). ``timeout_s``: an
    unanswered ping closes the connection after this long."""
    opts: list[tuple[str, int]] = []
    if time_s > 0:
        ms = int(time_s * 1000)
        opts += [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_permit_without_calls", 1)]
        opts += [("grpc.http2.min_ping_interval_without_data_ms", ms // 2)] if server else [("grpc.http2.max_pings_without_data", 0)]
    if timeout_s > 0:
        opts.append(("grpc.keepalive_timeout_ms", int(timeout_s * 1000)))
    return opts


def channel_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    """Options every shardrec server and channel uses (message caps set deliberately;
    ``max_receive_bytes`` when what may arrive is smaller than what may be sent)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes if max_receive_bytes is None else max_receive_bytes),
        ("grpc.so_reuseport", 0),
    ]


class _Health(health.HealthServicer):
    """The standard health servicer; every Check answer names the process (trailing metadata)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__()
        self._metadata = ((INSTANCE_ID_KEY, instance_id),)

    def Check(self, request, context):  # noqa: ANN001, ANN201 - grpc's signature
        context.set_trailing_metadata(self._metadata)
        return super().Check(request, context)


def _aio_health(instance_id: str):  # noqa: ANN202
    """The asyncio twin of ``_Health`` (grpc_health's asyncio module is imported only here)."""
    from grpc_health.v1 import _async as aio_health

    class _AioHealth(aio_health.HealthServicer):
        def __init__(self) -> None:
            super().__init__()
            self._metadata = ((INSTANCE_ID_KEY, instance_id),)

        async def Check(self, request, context):  # noqa: ANN001, ANN201
            context.set_trailing_metadata(self._metadata)
            return await super().Check(request, context)

    return _AioHealth()


def _register(server, add_servicers, service_names: tuple[str, ...], health_servicer) -> None:
    """Servicers, health and reflection on ``server`` (sync or asyncio alike)."""
    for add in add_servicers:
        add(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


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


def _health_names(service_names: Iterable[str], live_names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(every service, the readiness names, the liveness names)."""
    services, live = tuple(service_names), tuple(live_names)
    return services, ("", *(n for n in services if n not in live)), (LIVENESS, *live)


@dataclass
class SyncServer:
    """A started thread-pool gRPC server with its bound port and health servicer.
    ``readiness_names`` follow readiness, ``liveness_names`` are SERVING while it runs."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    instance_id: str = ""
    readiness_names: tuple[str, ...] = ("",)
    liveness_names: tuple[str, ...] = (LIVENESS,)
    _stopping: bool = field(default=False, repr=False)

    def set_serving(self, serving: bool) -> None:
        """Readiness (liveness is not touched). Ignored once stopping: a stopping server
        stays NOT_SERVING. Thread-safe."""
        if serving and self._stopping:
            return
        self.set_health(self.readiness_names, serving)

    def set_health(self, names: Iterable[str], serving: bool) -> None:
        """SERVING or NOT_SERVING for the health ``names`` only."""
        status = SERVING if serving else NOT_SERVING
        for name in names:
            self.health.set(name, status)

    def follow(self, readiness: Readiness) -> None:
        """Serving services SERVING exactly while ``readiness`` holds (until ``stop``)."""
        readiness.subscribe(self.set_serving)

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then refuse new calls and let in-flight ones finish within ``grace_s``."""
        self._stopping = True
        self.set_health(self.readiness_names, False)
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
    instance_id: str = "",
    live_names: Iterable[str] = (),
    security: Security = NO_SECURITY,
    options: Iterable[tuple[str, int]] = (),
) -> SyncServer:
    """Bind ``host:port`` (0 = any free port), register servicers, health (liveness and the
    ``live_names`` SERVING, readiness NOT_SERVING until ``set_serving(True)`` or a followed
    readiness holds) and reflection, and start. A request over ``max_receive_bytes`` (default
    ``max_message_bytes``) is refused by gRPC itself, RESOURCE_EXHAUSTED."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=[*channel_options(max_message_bytes, max_receive_bytes), *options],
        interceptors=security.interceptors(aio=False),
    )
    health_servicer = _Health(instance_id)
    services, ready, live = _health_names(service_names, live_names)
    _register(server, add_servicers, services, health_servicer)
    bound = _bind(server, host, port, security)
    s = SyncServer(server, bound, health_servicer, services, instance_id, ready, live)
    s.set_serving(False)
    s.set_health(live, True)
    server.start()
    return s


@dataclass
class AioServer:
    """A started grpc.aio server with its bound port and health servicer (event loop only);
    health names as ``SyncServer``'s."""

    server: grpc.aio.Server
    port: int
    health: "aio_health.HealthServicer"
    service_names: tuple[str, ...]
    instance_id: str = ""
    readiness_names: tuple[str, ...] = ("",)
    liveness_names: tuple[str, ...] = (LIVENESS,)
    _stopping: bool = field(default=False, repr=False)
    _wanted: bool = field(default=False, repr=False)
    _applied: bool = field(default=False, repr=False)
    _applier: "asyncio.Task | None" = field(default=None, repr=False)
    _statuses: dict[str, bool] = field(default_factory=dict, repr=False)  # the health last set per name

    async def set_serving(self, serving: bool) -> None:
        """Readiness (liveness is not touched); ignored once stopping."""
        if serving and self._stopping:
            return
        await self.set_health(self.readiness_names, serving)

    async def set_health(self, names: Iterable[str], serving: bool) -> None:
        """SERVING or NOT_SERVING for the health ``names`` only."""
        status = SERVING if serving else NOT_SERVING
        for name in names:
            await self.health.set(name, status)
            self._statuses[name] = serving

    def is_serving(self, name: str = "") -> bool:
        """Whether health ``name`` was last set SERVING (what a health Check of it answers)."""
        return self._statuses.get(name, False)

    def follow(self, readiness: Readiness) -> None:
        """Serving services SERVING exactly while ``readiness`` holds (until ``stop``). Call on
        the loop; ``readiness`` may change on any thread: each change hops onto the loop, where
        one task applies the latest value (so the last change always wins)."""
        loop = asyncio.get_running_loop()
        readiness.subscribe(lambda ready: loop.call_soon_threadsafe(self._want, ready))

    def _want(self, ready: bool) -> None:
        self._wanted = ready
        if self._applier is None or self._applier.done():
            self._applier = asyncio.ensure_future(self._apply())

    async def _apply(self) -> None:
        while self._applied != self._wanted and not self._stopping:
            target = self._wanted
            await self.set_serving(target)
            self._applied = target

    async def stop_serving(self) -> None:
        """Readiness NOT_SERVING for good (a lame duck: calls are still taken); liveness stays."""
        self._stopping = True
        await self.set_health(self.readiness_names, False)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then refuse new calls and let in-flight ones finish within ``grace_s``."""
        await self.stop_serving()
        await self.server.stop(grace_s)


async def start_aio_server(
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    add_servicers: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    instance_id: str = "",
    live_names: Iterable[str] = (),
    max_receive_bytes: int | None = None,
    security: Security = NO_SECURITY,
    options: Iterable[tuple[str, int]] = (),
    reuse_port: bool = False,
) -> AioServer:
    """The asyncio twin of ``start_sync_server`` (liveness SERVING, readiness NOT_SERVING until
    ``set_serving`` or a followed readiness). ``reuse_port``: share the port with the other
    processes bound to it with SO_REUSEPORT (frontend workers); off, a taken port fails the start."""
    base = [o for o in channel_options(max_message_bytes, max_receive_bytes) if o[0] != "grpc.so_reuseport"]
    server = grpc.aio.server(
        options=[*base, ("grpc.so_reuseport", int(reuse_port)), *options], interceptors=security.interceptors(aio=True)
    )
    health_servicer = _aio_health(instance_id)
    services, ready, live = _health_names(service_names, live_names)
    _register(server, add_servicers, services, health_servicer)
    bound = _bind(server, host, port, security)
    s = AioServer(server, bound, health_servicer, services, instance_id, ready, live)
    await s.set_serving(False)
    await s.set_health(live, True)
    await server.start()
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
