"""Frozen configuration per process. The ONLY module that reads environment variables.

Every setting is declared once, on its field below (``setting(...)``): its flag, its
``$SHARDREC_*`` variable and its key in a ``--config`` TOML file derive from its name
(``services.core.settings``); docs/configuration.md lists them (``tools/gen_config_doc.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from services.core.logs import LOG_FORMATS
from services.core.settings import (
    REQUIRED,
    Resolved,
    Setting,
    SettingTable,
    Shorthand,
    between,
    fed_by,
    nested,
    non_negative,
    tcp_port,
    positive,
    setting,
)

if TYPE_CHECKING:
    import argparse

LOOKUP_MODES = ("shards", "inproc", "redis-kv", "torchrec")
FEATURE_LOSS_MODES = ("fail", "defaults")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MiB = 1024 * 1024


def environment() -> Mapping[str, str]:
    """This process's environment: settings are read from it, and nothing else reads it."""
    return os.environ


def child_env(**overrides: str) -> dict[str, str]:
    """The environment a launched service process inherits, plus ``overrides``."""
    env = dict(os.environ)
    env.update(overrides)
    return env


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZkAuth:
    """This process's ZooKeeper user (digest scheme) and the digest ids of every role's users,
    from which znode ACLs are made (``services.core.discovery.acls``; docs/security.md)."""

    user: str
    password: str = field(repr=False)
    digests: dict[str, tuple[str, ...]] = field(default_factory=dict)


ZK_PASSWORD = Setting("zk_password", str, None, "the password of the --zk-auth user, instead of the file's", optional=True, secret=True)
REDIS_PASSWORD_FILE = Setting("redis_password_file", str, "", "Redis AUTH password: the file's first line (else $SHARDREC_REDIS_PASSWORD)",
                              metavar="FILE")  # fmt: skip


def load_zk_auth(path: str, password: str | None = None) -> ZkAuth | None:
    """The ZooKeeper credentials file (TOML: ``user``, ``password``, and ``[digests]`` with a
    list of digest ids per role: admin, shard, frontend); None for ""; ConfigError naming the
    file and the setting when it is unusable. ``password`` (default ``$SHARDREC_ZK_PASSWORD``)
    replaces the file's."""
    if not path:
        return None
    import tomllib

    from services.core.errors import ConfigError

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--zk-auth {path}: {e}") from e
    password = password or os.environ.get(ZK_PASSWORD.env) or doc.get("password")
    user = doc.get("user")
    if not isinstance(user, str) or not user or ":" in user:
        raise ConfigError(f"--zk-auth {path}: 'user' must be a non-empty name without ':'")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"--zk-auth {path}: no 'password' (in the file or ${ZK_PASSWORD.env})")
    digests = doc.get("digests", {})
    if not isinstance(digests, dict) or not all(isinstance(v, list) and all(isinstance(i, str) and ":" in i for i in v) for v in digests.values()):
        raise ConfigError(f"--zk-auth {path}: [digests] maps each role to a list of 'user:digest' ids")
    unknown = set(digests) - {"admin", "shard", "frontend"}
    if unknown:
        raise ConfigError(f"--zk-auth {path}: unknown role(s) in [digests]: {sorted(unknown)}")
    return ZkAuth(user, password, {role: tuple(ids) for role, ids in digests.items()})


def _redis_password(password: str | None, values: Mapping[str, Any]) -> str | None:
    """The password file's first line when one is named, else ``password`` (the variable's)."""
    path = values.get(REDIS_PASSWORD_FILE.name, "")
    if not path:
        return password or None
    from services.core.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"--redis-password-file {path}: {e}") from e
    if not line:
        raise ConfigError(f"--redis-password-file {path}: the file is empty")
    return line


@dataclass(frozen=True)
class RedisAuth:
    """Redis AUTH and TLS besides the URL (docs/security.md): the password (from a file or
    ``$SHARDREC_REDIS_PASSWORD``, never a flag's value) and, for TLS URLs, the CA that signs
    the server's certificate ("" = the system's)."""

    password: str | None = setting(None, "Redis AUTH password (or --redis-password-file)", name="redis_password", secret=True,
                                   convert=_redis_password, repr=False)  # fmt: skip
    ca_file: str = setting("", "with a rediss:// URL: the CA of the Redis server's certificate", name="redis_ca", metavar="PEM",
                           default_text="the system's CAs")  # fmt: skip


def redis_auth(password_file: str = "", ca_file: str = "") -> RedisAuth:
    """RedisAuth from a password file (its first line), else ``$SHARDREC_REDIS_PASSWORD``, else
    none; ConfigError naming the file when unreadable."""
    env = os.environ.get("SHARDREC_REDIS_PASSWORD")
    return RedisAuth(_redis_password(env, {REDIS_PASSWORD_FILE.name: password_file}), ca_file)


# -- shared parts of the process configs ----------------------------------------------------


def _zk_auth(path: str, values: Mapping[str, Any]) -> ZkAuth | None:
    return load_zk_auth(path, values.get(ZK_PASSWORD.name))


@dataclass(frozen=True)
class ZkConfig:
    hosts: str = setting("127.0.0.1:2181", "ZooKeeper hosts (host:port[,host:port...])", name="zk")
    cluster: str = setting("default", "cluster name (its ZooKeeper tree)")
    session_timeout_s: float = setting(10.0, "ZooKeeper session timeout: how long a lost process keeps its znodes", check=positive)
    connect_timeout_s: float = setting(15.0, "at start, how long to wait for a ZooKeeper server", name="zk_connect_timeout_s", check=positive)
    # None: no credentials, every znode open (as before)
    auth: ZkAuth | None = setting(None, "ZooKeeper credentials and the roles' digests: znodes get ACLs (docs/security.md)", name="zk_auth",
                                  kind=str, default="", metavar="TOML", convert=_zk_auth)  # fmt: skip


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate and key (served, and presented as its client certificate)
    and the CA that signs its peers'; all three or none (docs/security.md)."""

    cert_file: str = setting("", "this process's certificate: TLS on every port it serves, and its client certificate", name="tls_cert",
                             metavar="PEM")  # fmt: skip
    key_file: str = setting("", "the key of --tls-cert", name="tls_key", metavar="PEM")
    ca_file: str = setting("", "the CA that signs the peers' certificates (with --tls-cert)", name="tls_ca", metavar="PEM")
    poll_s: float = setting(1.0, "how often token and certificate files are checked for a change", name="secrets_poll_s", check=positive)

    def __post_init__(self) -> None:
        given = [bool(self.cert_file), bool(self.key_file), bool(self.ca_file)]
        if any(given) and not all(given):
            from services.core.errors import ConfigError

            raise ConfigError("TLS needs --tls-cert, --tls-key and --tls-ca together")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class AuthConfig:
    """Authentication of the calls a server takes (docs/security.md; off when all are empty)."""

    tokens_file: str = setting("", "hashed bearer tokens ([[token]] sha256, caller, admin): a frontend's Recommend needs a token; "
                               "admin RPCs need an admin token", metavar="TOML")  # fmt: skip
    cluster_token_file: str = setting("", "shared secret(s) of frontends and shards, one per line, when TLS is off: a shard takes "
                                      "Lookup only with one of them, a frontend sends the first", metavar="FILE")  # fmt: skip
    frontend_names: tuple[str, ...] = setting(("shardrec-frontend",), "with TLS: the client certificate common names that may call Lookup",
                                              name="frontend_cert_names", metavar="CN[,CN...]", processes=("shard",))  # fmt: skip
    poll_s: float = fed_by("secrets_poll_s", 1.0)


@dataclass(frozen=True)
class KeepaliveConfig:
    """gRPC keepalive of a process's server and channels (docs/configuration.md): 0 = gRPC's
    defaults (no pings from clients; servers ping a connection idle for 2 hours)."""

    time_s: float = setting(0.0, "ping a connection idle this long (server and shard channels); a server accepts client pings up to "
                            "twice that often: give shards and frontends the same", name="keepalive_time_ms", ms=True,
                            check=non_negative)  # fmt: skip
    timeout_s: float = setting(0.0, "close a connection whose ping is not answered within this (0 = gRPC's 20 s)",
                               name="keepalive_timeout_ms", ms=True, check=non_negative)  # fmt: skip


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"want one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics, traces and logs of one process (docs/observability.md)."""

    metrics_port: int | None = setting(None, "serve Prometheus /metrics on this HTTP port (0 = any free port)", default_text="no endpoint",
                                       check=tcp_port, metavar="PORT")  # fmt: skip
    metrics_host: str = setting("127.0.0.1", "address of the /metrics endpoint")
    trace_sample: float = setting(0.01, "head sampling of traces started here, 0..1; needs --otlp-endpoint or --trace-file",
                                  check=between(0, 1), metavar="RATIO")  # fmt: skip
    otlp_endpoint: str = setting("", "export spans to this OTLP/gRPC collector", metavar="HOST:PORT")
    trace_file: str = setting("", "append spans to this file, one JSON object a line", metavar="PATH")
    log_format: str = setting("text", "log lines as text or JSON", choices=LOG_FORMATS)
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS, parse=_level)

    @property
    def metrics(self) -> bool:
        return self.metrics_port is not None


# -- the processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardConfig:
    """One embedding shard process."""

    node_id: str = setting(REQUIRED, "stable node id, e.g. shard-0")
    zk: ZkConfig = nested(ZkConfig)
    host: str = setting("127.0.0.1", "address to bind (:: = every IPv6 and IPv4 address)")
    port: int = setting(0, "port to bind (0 = any free port)", check=tcp_port)
    advertise_host: str = setting("", "host other processes dial", default_text="--host")
    torch_threads: int = setting(1, "torch threads for pooling", check=positive)
    rpc_threads: int = setting(8, "gRPC server threads (Lookups served at once)", check=positive)
    # Lookup caps (docs/overload.md, "Shard Lookup limits"): ids and bags over all groups of a
    # request; a request or answer over max_message_bytes is refused too.
    max_ids_per_request: int = setting(4_000_000, "cap on ids per Lookup (RESOURCE_EXHAUSTED above)", name="max_ids", check=positive)
    max_bags_per_request: int = setting(1_000_000, "cap on bags per Lookup (RESOURCE_EXHAUSTED above)", name="max_bags", check=positive)
    max_message_bytes: int = setting(256 * MiB, "cap on a request's and an answer's bytes", check=positive)
    grace_s: float = setting(5.0, "drain period for in-flight calls on SIGTERM", check=non_negative)
    verify_checksums: bool = setting(True, "skip sha256 verification of checkpoint files", name="no_verify", switch=True, default=False,
                                     convert=lambda v, _: not v)  # fmt: skip
    load_rate_bytes_s: int = setting(0, "throttle loading, bytes/s (0 = as fast as the disk)", check=non_negative)
    # Paced swaps (docs/checkpoint.md): verifying, reading and writing a delta's rows in chunks.
    swap_cpu_share: float = setting(0.05, "applying a delta takes at most this share of one core (1 = unpaced)", check=positive,
                                    metavar="SHARE")  # fmt: skip
    version_drain_s: float = setting(2.0, "drop a version this long after no frontend serves it", check=non_negative)
    partition_drain_s: float = setting(5.0, "drop a partition this long after no shard map gives it to this node (requests on the old "
                                       "map are served meanwhile)", check=non_negative)  # fmt: skip
    stats_interval_s: float = setting(5.0, "publish per-partition load counters in the znode this often", check=positive)
    tls: TlsConfig = nested(TlsConfig, default=TlsConfig())
    auth: AuthConfig = nested(AuthConfig, default=AuthConfig())
    keepalive: KeepaliveConfig = nested(KeepaliveConfig, default=KeepaliveConfig())
    observability: ObservabilityConfig = nested(ObservabilityConfig, default=ObservabilityConfig())


def _bytes(text: str) -> int:
    """Bytes: an integer, or one with a K, M or G suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ValueError(f"want bytes such as 67108864, 64M or 1G, got {text!r}") from None


def _hedge_delay(text: str) -> float | None:
    """'p95' (the node's recent p95) -> None; else milliseconds."""
    try:
        return None if text.lower() == "p95" else float(text)
    except ValueError:
        raise ValueError(f"want p95 or a number of milliseconds, got {text!r}") from None


@dataclass(frozen=True)
class FrontendConfig:
    """One frontend process."""

    frontend_id: str = setting("", "id in ZooKeeper", default_text="frontend-<host>-<pid>")
    zk: ZkConfig | None = nested(ZkConfig, default=None)  # None with a baseline lookup
    # The feature store (docs/features.md, docs/failure-modes.md).
    redis_url: str = setting("", "Redis URL of the stored features: redis://host:port/db, rediss:// (TLS) or "
                             "redis+sentinel://host:port[,host:port...]/master[/db]", name="redis", metavar="URL",
                             default_text="none: every user and item gets the defaults")  # fmt: skip
    redis_prefix: str = setting("", "key prefix of the stored features")
    redis_auth: RedisAuth = nested(RedisAuth, default=RedisAuth())  # of both Redis URLs (features, redis-kv rows)
    redis_timeout_s: float = setting(0.2, "ceiling of one feature store read (a batch's deadline may cut it shorter)",
                                     name="redis_timeout_ms", ms=True, check=positive)  # fmt: skip
    on_feature_loss: str = setting("fail", "while the feature store is lost or unreachable: fail (UNAVAILABLE) or defaults (every stored "
                                   "feature at its default, the answer flagged degraded)", choices=FEATURE_LOSS_MODES)  # fmt: skip
    feature_sync: bool = setting(True, "reload a lost feature store from the checkpoint's feature files (one frontend at a time)", onoff=True)
    feature_check_s: float = setting(1.0, "read the feature store's marker when no batch did for this long", name="feature_check_ms",
                                     ms=True, check=positive)  # fmt: skip
    features_root: str = setting("", "where that reload finds features/{users,items}.npz", name="features", metavar="ROOT",
                                 default_text="the served checkpoint's root")  # fmt: skip
    host: str = setting("127.0.0.1", "address to bind (:: = every IPv6 and IPv4 address)")
    port: int = setting(0, "gRPC port (0 = any free port)", check=tcp_port)
    advertise_host: str = setting("", "host other processes dial", default_text="--host")
    workers: int = setting(1, "frontend processes sharing the gRPC (and REST) port through SO_REUSEPORT, each a frontend of its own "
                           "(admission limit, caller buckets, cache, ZooKeeper id <id>-w<i>); restarted when one dies (docs/workers.md)",
                           check=positive)  # fmt: skip
    inproc_checkpoint: str = ""  # set = the monolith: every table in this process, no shards (from lookup)
    max_batch: int = setting(64, "requests per micro-batch at most", check=positive)
    max_wait_s: float = setting(0.002, "how long a batch may wait for more requests while another is in flight", name="max_wait_ms",
                                ms=True, check=non_negative)  # fmt: skip
    adaptive_wait_s: float = setting(0.010, "adaptive batch window instead of --max-wait-ms: while another batch is in flight, wait "
                                     "this long times the load (the share of time a batch is in flight: near 0 when idle, 1 towards "
                                     "saturation), never past the batch's deadline slack; 0 = off (then --max-wait-ms)",
                                     name="adaptive_wait_ms", ms=True,
                                     check=non_negative)  # fmt: skip
    max_queue: int = setting(1024, "queued requests before RESOURCE_EXHAUSTED", check=positive)
    max_in_flight_batches: int = setting(2, "batches in the pipeline at once (one's lookups overlap another's scoring)", check=positive)
    max_candidates: int = setting(1000, "candidates per request at most", check=positive)
    default_timeout_s: float = setting(1.0, "deadline of a call that has none", name="default_timeout_ms", ms=True, check=positive)
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda[:N]")
    torch_threads: int = setting(1, "torch threads for scoring", check=positive)
    max_message_bytes: int = setting(256 * MiB, "cap of a message on the shard channels (a Lookup answer may be big)", check=positive)
    max_request_bytes: int = setting(4 * MiB, "receive cap of a Recommend (gRPC message or REST body; one is ~10 KB)", check=positive)
    http_port: int | None = setting(None, "serve REST/JSON (POST /v1/recommend, /healthz, /readyz, /openapi.json; docs/http.md) on this "
                                    "port; 0 = any free port", default_text="off", check=tcp_port, metavar="PORT")  # fmt: skip
    grace_s: float = setting(5.0, "at shutdown, how long in-flight calls may take to finish", check=non_negative)
    lame_duck_s: float = setting(1.0, "at shutdown, how long health says NOT_SERVING while calls are still taken (callers move away)",
                                 check=non_negative)  # fmt: skip
    ready_timeout_s: float = setting(120.0, "at start, how long to wait for a shard map, a serving version and a live replica of "
                                     "every partition", check=positive)  # fmt: skip
    lookup: str = setting("shards", "the lookup step: shards (the cluster in ZooKeeper) or a comparison baseline that takes the model "
                          "from --checkpoint: inproc (the monolith), redis-kv (rows in Redis, pipelined MGET; load them with 'shardrec "
                          "bench load-kv'), torchrec (EmbeddingBagCollection; optional install)", choices=LOOKUP_MODES,
                          shorthands=(Shorthand("--inproc", "inproc", "the monolith: every table in this process, no shards"),))  # fmt: skip
    checkpoint: str = setting("", "checkpoint URI (with --lookup inproc, redis-kv or torchrec)")
    kv_redis_url: str = setting("", "redis-kv: Redis holding the rows", name="kv_redis", metavar="URL", default_text="--redis")
    kv_prefix: str = setting("kv:", "redis-kv: key prefix of the rows")
    cache_bytes: int = setting(0, "embedding cache in front of the shards or redis-kv, at most this many bytes (e.g. 64M, 1G; "
                               "0 = off; docs/cache.md)", parse=_bytes, metavar="BYTES", check=non_negative)  # fmt: skip
    pooled_dtype: str = setting("float32", "dtype of the pooled vectors the shards send back: float16 halves those bytes, within "
                                "the error bound of docs/fanout.md (requests with weighted bags stay float32)",
                                choices=("float32", "float16"))  # fmt: skip
    # Replica choice (shards): a node that errors or times out is ejected, doubled per failure in a row.
    eject_s: float = setting(1.0, "first ejection of a shard that errors or times out; doubles per failure in a row", check=positive)
    eject_max_s: float = setting(10.0, "longest ejection", check=positive)
    hedge_delay_s: float | None = setting(None, "send a late shard call to another replica too after this long: p95 (the node's recent "
                                          "p95, at least --hedge-min-delay-ms), a fixed delay, or 0 = no hedging", name="hedge_delay_ms",
                                          ms=True, parse=_hedge_delay, metavar="MS|p95", default_text="p95", check=non_negative)  # fmt: skip
    hedge_min_delay_s: float = setting(0.002, "floor of the p95 hedge delay", name="hedge_min_delay_ms", ms=True, check=non_negative)
    hedge_budget: float = setting(0.05, "hedge RPCs per Lookup RPC at most (0 = no hedging)", check=between(0, 1))
    # Admission control and per-caller limits (docs/overload.md).
    admission: bool = setting(True, "admission control: refuse at once what would queue past the latency target or the deadline",
                              onoff=True)  # fmt: skip
    latency_target_s: float = setting(0.050, "latency the adaptive concurrency limit holds for admitted requests, whatever the callers' "
                                      "deadlines", name="latency_target_ms", ms=True, check=positive)  # fmt: skip
    caller_rate_rps: float = setting(0.0, "requests/s per caller identity not named in --caller-limits; 0 = unlimited", check=non_negative)
    caller_burst: float = setting(0.0, "burst per caller", default_text="one second of --caller-rate-rps", check=non_negative)
    caller_limits_file: str = setting("", "per-caller rates: [callers.NAME] rate_rps = R, burst = B", name="caller_limits", metavar="TOML")
    degrade_max_candidates: int = setting(0, "degraded mode under shedding: score only the first N candidates of a request (0 = off)",
                                          check=non_negative)  # fmt: skip
    max_abs_dense: float = setting(1e6, "largest magnitude of a request-time dense value", check=positive)
    max_abs_weight: float = setting(1e6, "largest magnitude of a request-time sparse weight", check=positive)
    tls: TlsConfig = nested(TlsConfig, default=TlsConfig())
    auth: AuthConfig = nested(AuthConfig, default=AuthConfig())
    keepalive: KeepaliveConfig = nested(KeepaliveConfig, default=KeepaliveConfig())
    observability: ObservabilityConfig = nested(ObservabilityConfig, default=ObservabilityConfig())


ZK_SETTINGS = SettingTable.of("zk", ZkConfig, extras=(("zk_auth", ZK_PASSWORD),))
SHARD_SETTINGS = SettingTable.of("shard", ShardConfig, extras=(("zk_auth", ZK_PASSWORD),))
FRONTEND_SETTINGS = SettingTable.of("frontend", FrontendConfig, extras=(("zk_auth", ZK_PASSWORD), ("redis_prefix", REDIS_PASSWORD_FILE)))
REDIS_AUTH_SETTINGS = SettingTable.of("redis", RedisAuth, extras=(("", REDIS_PASSWORD_FILE),))


def resolve(table: SettingTable, args: argparse.Namespace) -> Resolved:
    """``table``'s settings from ``args`` (flags), this process's environment and the
    ``--config`` file, checked (ConfigError naming the setting)."""
    return table.resolve(args, environment())


def env_default(s: Setting) -> Any:
    """The value of ``s`` from this process's environment, else its default: the default of a
    flag of an admin command (those read the settings they share with the processes, such as
    --zk, this way; ConfigError for a bad value)."""
    from services.core.errors import ConfigError

    if s.env not in os.environ:
        return s.default
    try:
        return s.from_text(os.environ[s.env])
    except ValueError as e:
        raise ConfigError(f"{s.flag} (from env {s.env}): {e}") from None


def shard_config(r: Resolved) -> ShardConfig:
    return SHARD_SETTINGS.build(r)


def frontend_config(r: Resolved) -> FrontendConfig:
    """The frontend's config: the settings, checked together, and the fields derived from them
    (the lookup's checkpoint, the redis-kv URL, no ZooKeeper for a baseline, the default id)."""
    import socket

    from services.core.errors import ConfigError

    lookup, checkpoint, kv_redis = r["lookup"], r["checkpoint"], r["kv_redis"] or r["redis"]
    if lookup != "shards" and not checkpoint:
        raise ConfigError(f"{r.sources['lookup'].removeprefix('flag ')} {'' if r.sources['lookup'] == 'flag --inproc' else lookup + ' '}"
                          "needs --checkpoint URI")  # fmt: skip
    if r["eject_max_s"] < r["eject_s"]:
        raise ConfigError(f"--eject-max-s must be at least --eject-s, got {r['eject_max_s']} and {r['eject_s']}")
    if lookup == "redis-kv" and not kv_redis:
        raise ConfigError("--lookup redis-kv needs --kv-redis URL (or --redis URL) of the Redis holding the rows")
    config = FRONTEND_SETTINGS.build(r)
    return replace(
        config,
        frontend_id=config.frontend_id or f"frontend-{socket.gethostname()}-{os.getpid()}",
        zk=config.zk if lookup == "shards" else None,
        inproc_checkpoint=checkpoint if lookup == "inproc" else "",
        checkpoint=checkpoint if lookup != "shards" else "",
        kv_redis_url=kv_redis if lookup == "redis-kv" else "",
    )
