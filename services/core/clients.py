"""The one place shardrec creates its ZooKeeper clients, Redis clients (sync and asyncio) and
gRPC channels (sync and asyncio), in services/ and benchmarks/ alike (tests use it too).

Security goes here and nowhere else: ZooKeeper TLS (``use_ssl``, ``certfile``, ``keyfile``,
``ca``), ZooKeeper ACLs (``auth_data`` + ``default_acl``), Redis AUTH / TLS (``username``,
``password``, ``rediss://``), Redis Sentinel (``redis+sentinel://``) and gRPC channel credentials are added to these factories, from
fields of the process's frozen config, so every process gets them at once.
``tests/unit/test_clients_only.py`` fails when a client is constructed anywhere else.

Libraries are imported inside the factories, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.core.config import RedisAuth, ZkConfig
from services.core.errors import ConfigError, UnavailableError

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


def make_redis(
    url: str, *, timeout_s: float | None = None, retries: int | None = None, auth: RedisAuth | None = None
) -> "redis.Redis":
    """A Redis client for ``url`` that speaks bytes (``decode_responses=False``). Connections are
    made lazily, on the first command, from the client's pool; it is thread-safe.

    ``url`` is ``redis://[user:pass@]host:port/db`` (``rediss://`` selects TLS) or, for a primary
    watched by Redis Sentinel, ``redis+sentinel://[user:pass@]host:port[,host:port...]/master[/db]``
    (``rediss+sentinel://``: TLS to the sentinels and the primary; ``parse_sentinel_url``): the
    client asks the sentinels where the primary is on every new connection, so it follows a
    failover. ``timeout_s`` bounds connecting and every reply (default: 5 s to connect, replies
    unbounded). ``retries`` is how often redis-py itself retries a command after a connection
    error or timeout (None: its default; 0 for callers that bound and retry calls themselves).

    AUTH: the URL's password, else ``auth.password`` (from a file or the environment,
    ``core.config.redis_auth``); TLS is verified against ``auth.ca_file``. Behind Sentinel the
    primary gets that password and the sentinels ``AUTH default <password>``, which a sentinel
    with that ``requirepass`` checks and one without a password accepts (docs/security.md).
    """
    import redis

    connect_s = 5.0 if timeout_s is None else timeout_s
    options = {**_REDIS_OPTIONS, "socket_connect_timeout": connect_s, "socket_timeout": timeout_s, **_retry(retries, aio=False)}
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return redis.Redis.from_url(url, **options, **_redis_auth(url, auth))
    from redis.sentinel import Sentinel

    master, sentinels = _sentinel_options(sentinel, options, auth)
    return Sentinel(list(sentinel.sentinels), sentinel_kwargs=sentinels).master_for(sentinel.master, **master)


def _redis_auth(url: str, auth: RedisAuth | None) -> dict[str, Any]:
    """AUTH and TLS options of a ``redis://`` / ``rediss://`` URL (the URL's own password wins)."""
    opts: dict[str, Any] = {}
    if auth is not None and auth.password:
        opts["password"] = auth.password
    if auth is not None and auth.ca_file and url.lower().startswith("rediss://"):
        opts["ssl_ca_certs"] = auth.ca_file
    return opts


def _quiet_logger() -> "logging.Logger":
    """A logger that drops everything below CRITICAL, for clients whose failures are expected."""
    import logging

    log = logging.getLogger("shardrec.clients.quiet")
    log.setLevel(logging.CRITICAL)
    return log


def make_async_redis(
    url: str, *, timeout_s: float | None = None, retries: int | None = None, auth: RedisAuth | None = None
) -> "redis.asyncio.Redis":
    """The ``redis.asyncio`` twin of ``make_redis`` (same URL forms, Sentinel included, AUTH, TLS
    and settings; ``timeout_s`` also bounds connecting when given), for an event loop: use and
    close it (``await client.aclose()``) on the loop that first uses it."""
    import redis.asyncio

    options: dict[str, Any] = {**_REDIS_OPTIONS, **_retry(retries, aio=True)}
    if timeout_s is not None:
        options.update(socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return redis.asyncio.Redis.from_url(url, **options, **_redis_auth(url, auth))
    from redis.asyncio.sentinel import Sentinel

    master, sentinels = _sentinel_options(sentinel, options, auth)
    return Sentinel(list(sentinel.sentinels), sentinel_kwargs=sentinels).master_for(sentinel.master, **master)


_REDIS_OPTIONS: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": 5.0, "health_check_interval": 30}
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")  # the second: TLS


@dataclass(frozen=True)
class SentinelUrl:
    """A ``redis+sentinel://`` URL: the sentinels, the name of the primary they watch, the db,
    the primary's credentials and whether both are reached over TLS (``rediss+sentinel://``)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """``redis[s]+sentinel://[user:pass@]host:port[,host:port...]/master[/db]`` -> SentinelUrl;
    None for any other scheme; ConfigError naming what is wrong otherwise.

    >>> parse_sentinel_url("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/features/2").db
    2
    """
    from urllib.parse import unquote

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    want = f"want {scheme}://host:port[,host:port...]/master[/db]"
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
    sentinels = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ConfigError(f"{url!r}: sentinel {part!r} is not host:port ({want})")
        sentinels.append((host.strip("[]"), int(port)))
    master, _, db = path.strip("/").partition("/")
    if not master or (db and not db.isdigit()):
        raise ConfigError(f"{url!r}: {want} (the primary's name as the sentinels know it)")
    tls = scheme.lower() == SENTINEL_SCHEMES[1]
    return SentinelUrl(tuple(sentinels), unquote(master), int(db or 0), username, password, tls)


def _sentinel_options(
    url: SentinelUrl, options: dict[str, Any], auth: RedisAuth | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of the primary's connections and of the sentinels' (the same timeouts and
    retries). The primary's password is the URL's, else ``auth``'s; the sentinels get it as
    ``AUTH default <password>``, which works whether or not they require one (Redis 6+: the
    two-argument AUTH of a user without a password succeeds). TLS (``rediss+sentinel``) to both,
    verified against ``auth.ca_file``."""
    password = url.password or (auth.password if auth is not None else None)
    sentinels = {k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"}
    master = {**options, "db": url.db, "username": url.username, "password": password}
    if password:
        sentinels.update(username="default", password=password)
    if url.tls:
        tls = {"ssl": True, **({"ssl_ca_certs": auth.ca_file} if auth is not None and auth.ca_file else {})}
        master.update(tls)
        sentinels.update(tls)
    return master, sentinels


def _retry(retries: int | None, *, aio: bool) -> dict[str, Any]:
    """redis-py's ``retry`` option for ``retries`` retries without backoff (None: its default)."""
    if retries is None:
        return {}
    from redis.backoff import NoBackoff

    if aio:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]
    return {"retry": Retry(NoBackoff(), retries)}


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
