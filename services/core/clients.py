"""The one place shardrec creates its ZooKeeper clients, Redis clients (sync and asyncio) and
gRPC channels (sync and asyncio), in services/ and benchmarks/ alike (tests use it too).

Security goes here and nowhere else: ZooKeeper TLS (``use_ssl``, ``certfile``, ``keyfile``,
``ca``), ZooKeeper ACLs (``auth_data`` + ``default_acl``), Redis AUTH / TLS (``username``,
``password``, ``rediss://``) and gRPC channel credentials are added to these factories, from
fields of the process's frozen config, so every process gets them at once.
``tests/unit/test_clients_only.py`` fails when a client is constructed anywhere else.

Libraries are imported inside the factories, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from services.core.config import RedisAuth, ZkConfig
from services.core.errors import UnavailableError

if TYPE_CHECKING:
    import logging

    import grpc
    import grpc.aio
    import redis
    import redis.asyncio
    from kazoo.client import KazooClient


def make_kazoo(zk: ZkConfig, *, read_only: bool = False, quiet: bool = False) -> "KazooClient":
    """A started kazoo client for ``zk.hosts``; the caller owns it (``stop()`` then ``close()``).

    The session timeout is ``zk.session_timeout_s``. After a connection loss the client
    reconnects forever (``KazooRetry(max_tries=-1)``, backoff capped at a third of the session
    timeout so it comes back before the session can expire). ``read_only=True`` lets it attach
    to a read-only server during a quorum loss.

    Raises UnavailableError naming the hosts when no server answers within
    ``zk.connect_timeout_s``. Call from any thread except a kazoo callback thread.
    """
    from kazoo.client import KazooClient
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.retry import KazooRetry

    max_delay_s = min(2.0, max(0.1, zk.session_timeout_s / 3))
    acl = {}
    if zk.auth is not None:
        from services.core.discovery.acls import ZnodeAcls

        acl = {"auth_data": [("digest", f"{zk.auth.user}:{zk.auth.password}")]}
        client_class = _acl_client_class(ZnodeAcls(zk.auth.digests).acl_for)
    else:
        client_class = KazooClient
    client = client_class(
        hosts=zk.hosts,
        timeout=zk.session_timeout_s,
        read_only=read_only,
        connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_jitter=0.2, max_delay=max_delay_s),
        command_retry=KazooRetry(max_tries=5, delay=0.05, backoff=2, max_jitter=0.2, max_delay=max_delay_s),
        logger=_quiet_logger() if quiet else None,  # None: kazoo's own logger
        **acl,
    )
    try:
        client.start(timeout=zk.connect_timeout_s)
    except KazooTimeoutError as e:
        client.stop()
        client.close()
        raise UnavailableError(
            f"cannot connect to ZooKeeper at {zk.hosts!r} within {zk.connect_timeout_s:g}s"
        ) from e
    return client


def _acl_client_class(acl_for):  # noqa: ANN001, ANN202
    """A KazooClient whose every create (``makepath`` parents and ``ensure_path`` included: they
    all go through ``create_async``) gets the ACL of its path from the one table
    (``services.core.discovery.acls``), whatever ACL the caller passed."""
    from kazoo.client import KazooClient

    class AclKazooClient(KazooClient):
        def create_async(self, path, value=b"", acl=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return super().create_async(path, value, acl_for(path), *args, **kwargs)

    return AclKazooClient


def make_redis(url: str, *, timeout_s: float | None = None, auth: RedisAuth | None = None) -> "redis.Redis":
    """A Redis client for ``url`` (``redis://host:port/db``) that speaks bytes
    (``decode_responses=False``). Connections are made lazily, on the first command, from the
    client's pool; it is thread-safe. AUTH: ``auth.password`` (from a file or the environment,
    ``core.config.redis_auth``), or the URL's (``redis://user:pass@host``); ``rediss://``
    selects TLS, verified against ``auth.ca_file``. ``timeout_s`` bounds connecting and every
    reply (default: 5 s to connect, replies unbounded).
    """
    import redis

    connect_s = 5.0 if timeout_s is None else timeout_s
    opts = {**_REDIS_OPTIONS, "socket_connect_timeout": connect_s, "socket_timeout": timeout_s, **_redis_auth(url, auth)}
    return redis.Redis.from_url(url, **opts)


def _redis_auth(url: str, auth: RedisAuth | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if auth is not None and auth.password:
        opts["password"] = auth.password
    if auth is not None and auth.ca_file and url.startswith("rediss://"):
        opts["ssl_ca_certs"] = auth.ca_file
    return opts


def _quiet_logger() -> "logging.Logger":
    """A logger that drops everything below CRITICAL, for clients whose failures are expected."""
    import logging

    log = logging.getLogger("shardrec.clients.quiet")
    log.setLevel(logging.CRITICAL)
    return log


def make_async_redis(url: str, *, auth: RedisAuth | None = None) -> "redis.asyncio.Redis":
    """The ``redis.asyncio`` twin of ``make_redis`` (same URL forms, AUTH and settings), for an
    event loop: use and close it (``await client.aclose()``) on the loop that first uses it."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, **_REDIS_OPTIONS, **_redis_auth(url, auth))


_REDIS_OPTIONS: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": 5.0, "health_check_interval": 30}


def make_channel(
    address: str,
    *,
    max_message_bytes: int | None = None,
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = True,
    credentials: "grpc.ChannelCredentials | None" = None,
) -> "grpc.aio.Channel | grpc.Channel":
    """A gRPC channel to ``address`` (``host:port``): ``grpc.aio`` (default) or, ``aio=False``,
    a blocking one. The caller owns it and closes it (``await ch.close()`` / ``ch.close()``).

    ``max_message_bytes`` sets both message caps (``services.core.rpc.server.channel_options``,
    what shardrec servers use); None keeps gRPC's defaults (4 MiB received), enough for
    Recommend and admin calls. ``options`` are added after those. ``credentials`` (from
    ``services.core.tls``: the process's ``TlsMaterial.channel_credentials()``, or
    ``client_credentials(ca)`` outside the cluster) make it TLS; None is plaintext.
    """
    import grpc

    opts: list[tuple[str, Any]] = []
    if max_message_bytes is not None:
        from services.core.rpc.server import channel_options

        opts += channel_options(max_message_bytes)
    opts += options
    if aio:
        import grpc.aio

        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=opts or None)
        return grpc.aio.insecure_channel(address, options=opts or None)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts or None)
    return grpc.insecure_channel(address, options=opts or None)
