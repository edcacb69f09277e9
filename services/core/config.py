"""Frozen configuration per process. The ONLY module that reads environment variables.

Every value has a flag; an environment variable gives the flag's default (``SHARDREC_ZK``,
``SHARDREC_CLUSTER``, ...), so containers can be configured without flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def default_zk() -> str:
    return env_str("SHARDREC_ZK", "127.0.0.1:2181")


def default_cluster() -> str:
    return env_str("SHARDREC_CLUSTER", "default")


def default_zk_auth_file() -> str:
    return env_str("SHARDREC_ZK_AUTH", "")


@dataclass(frozen=True)
class ZkAuth:
    """This process's ZooKeeper user (digest scheme) and the digest ids of every role's users,
    from which znode ACLs are made (``services.core.discovery.acls``; docs/security.md)."""

    user: str
    password: str = field(repr=False)
    digests: dict[str, tuple[str, ...]] = field(default_factory=dict)


def load_zk_auth(path: str) -> ZkAuth | None:
    """The ZooKeeper credentials file (TOML: ``user``, ``password``, and ``[digests]`` with a
    list of digest ids per role: admin, shard, frontend); None for ""; ConfigError naming the
    file and the setting when it is unusable. The password may come from
    ``$SHARDREC_ZK_PASSWORD`` instead of the file."""
    if not path:
        return None
    import tomllib

    from services.core.errors import ConfigError

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--zk-auth {path}: {e}") from e
    password = os.environ.get("SHARDREC_ZK_PASSWORD") or doc.get("password")
    user = doc.get("user")
    if not isinstance(user, str) or not user or ":" in user:
        raise ConfigError(f"--zk-auth {path}: 'user' must be a non-empty name without ':'")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"--zk-auth {path}: no 'password' (in the file or $SHARDREC_ZK_PASSWORD)")
    digests = doc.get("digests", {})
    if not isinstance(digests, dict) or not all(isinstance(v, list) and all(isinstance(i, str) and ":" in i for i in v) for v in digests.values()):
        raise ConfigError(f"--zk-auth {path}: [digests] maps each role to a list of 'user:digest' ids")
    unknown = set(digests) - {"admin", "shard", "frontend"}
    if unknown:
        raise ConfigError(f"--zk-auth {path}: unknown role(s) in [digests]: {sorted(unknown)}")
    return ZkAuth(user, password, {role: tuple(ids) for role, ids in digests.items()})


@dataclass(frozen=True)
class RedisAuth:
    """Redis AUTH and TLS besides the URL (docs/security.md): the password (from a file or
    ``$SHARDREC_REDIS_PASSWORD``, never a flag's value) and, for ``rediss://``, the CA that
    signs the server's certificate ("" = the system's)."""

    password: str | None = field(default=None, repr=False)
    ca_file: str = ""


def redis_auth(password_file: str = "", ca_file: str = "") -> RedisAuth:
    """RedisAuth from ``--redis-password-file`` (its first line), else
    ``$SHARDREC_REDIS_PASSWORD``, else none; ConfigError naming the file when unreadable."""
    password = os.environ.get("SHARDREC_REDIS_PASSWORD") or None
    if password_file:
        from services.core.errors import ConfigError

        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().strip() or None
        except OSError as e:
            raise ConfigError(f"--redis-password-file {password_file}: {e}") from e
        if password is None:
            raise ConfigError(f"--redis-password-file {password_file}: the file is empty")
    return RedisAuth(password, ca_file)


@dataclass(frozen=True)
class ZkConfig:
    hosts: str
    cluster: str
    session_timeout_s: float = 10.0
    connect_timeout_s: float = 15.0
    auth: ZkAuth | None = None  # None: no credentials, every znode open (as before)


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate and key (served, and presented as its client certificate)
    and the CA that signs its peers'; all three or none (docs/security.md)."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    poll_s: float = 1.0  # how often the files are checked for a change (rotation)

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

    tokens_file: str = ""  # hashed caller and admin tokens
    cluster_token_file: str = ""  # shared secret(s) of frontends and shards, when TLS is off
    frontend_names: tuple[str, ...] = ("shardrec-frontend",)  # mTLS: certificate names allowed to call Lookup
    poll_s: float = 1.0


@dataclass(frozen=True)
class ShardConfig:
    """One embedding shard process."""

    node_id: str
    zk: ZkConfig
    host: str = "127.0.0.1"
    port: int = 0
    # Address other processes dial; default host:bound_port.
    advertise_host: str = ""
    torch_threads: int = 1
    rpc_threads: int = 8
    # Lookup caps (docs/overload.md, "Shard Lookup limits"): ids and bags over all groups of a
    # request; a request or answer over max_message_bytes is refused too.
    max_ids_per_request: int = 4_000_000
    max_bags_per_request: int = 1_000_000
    max_message_bytes: int = 256 * 1024 * 1024
    grace_s: float = 5.0
    verify_checksums: bool = True
    # Load throttle (bytes/s, 0 = unthrottled), used to make moves observable in tests.
    load_rate_bytes_s: int = 0
    # A version no live frontend serves any more is dropped this long after it became unused.
    version_drain_s: float = 2.0
    # A partition no shard map gives this node any more is dropped this long after that
    # (requests routed with the previous map are served meanwhile).
    partition_drain_s: float = 5.0
    # How often the per-partition load counters are sampled and published in the znode.
    stats_interval_s: float = 5.0
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()


@dataclass(frozen=True)
class FrontendConfig:
    """One frontend process."""

    frontend_id: str
    zk: ZkConfig | None  # None with ``inproc``
    redis_url: str = ""  # "" = no stored features (every user and item gets defaults)
    redis_prefix: str = ""
    redis_auth: RedisAuth = RedisAuth()  # of both Redis URLs (features, redis-kv rows)
    # The feature store (docs/features.md, docs/failure-modes.md): the ceiling of one Redis call
    # (the batch's deadline may cut it shorter); what a lost or unreachable store gives callers
    # ("fail": UNAVAILABLE; "defaults": every stored feature at its default, flagged degraded);
    # whether this frontend reloads a lost store from the checkpoint; how often the marker is
    # read when no batch read it.
    redis_timeout_s: float = 0.2
    on_feature_loss: str = "fail"
    feature_sync: bool = True
    feature_check_s: float = 1.0
    features_root: str = ""  # where a reload finds features/{users,items}.npz ("" = the checkpoint root)
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    inproc_checkpoint: str = ""  # set = the monolith: every table in this process, no shards
    max_batch: int = 64
    max_wait_s: float = 0.002
    max_queue: int = 1024
    max_in_flight_batches: int = 2
    max_candidates: int = 1000
    default_timeout_s: float = 1.0
    device: str = "auto"
    torch_threads: int = 1
    # Caps of the shard channels (a Lookup answer may be big) and of what this frontend sends.
    max_message_bytes: int = 256 * 1024 * 1024
    # The public receive cap (gRPC Recommend and the REST body): a Recommend is ~10 KB.
    max_request_bytes: int = 4 * 1024 * 1024
    # The REST endpoint (docs/http.md): None = off, 0 = any free port.
    http_port: int | None = None
    grace_s: float = 5.0
    # NOT_SERVING this long before refusing new calls at shutdown (docs/deploy.md, rolling upgrades).
    lame_duck_s: float = 1.0
    ready_timeout_s: float = 120.0
    # The lookup step: "shards" (the cluster), or a comparison baseline that takes its model from
    # ``checkpoint``: "inproc" (the monolith, also selected by ``inproc_checkpoint``),
    # "redis-kv" (rows in Redis, pipelined MGET, pooled here), "torchrec" (an
    # EmbeddingBagCollection in this process; needs the optional torchrec install).
    lookup: str = "shards"
    checkpoint: str = ""  # checkpoint URI of the inproc / redis-kv / torchrec lookups
    kv_redis_url: str = ""  # redis-kv: Redis holding the rows ("" = ``redis_url``)
    kv_prefix: str = "kv:"  # redis-kv: key prefix of the rows (as given to ``bench load-kv``)
    # Replica choice (shards): a node that errors or times out is ejected for eject_s, doubled
    # for each failure in a row up to eject_max_s, then probed with one call at a time.
    eject_s: float = 1.0
    eject_max_s: float = 10.0
    # Hedging: a shard call not answered after hedge_delay_s (None = that node's recent p95,
    # at least hedge_min_delay_s; 0 = never) goes to other replicas too, first answer wins;
    # hedge RPCs stay within hedge_budget of Lookup RPCs (0 = never).
    hedge_delay_s: float | None = None
    hedge_min_delay_s: float = 0.002
    hedge_budget: float = 0.05
    # Admission control (docs/overload.md): a concurrency limit that holds latency_target_s,
    # refusals of requests that cannot meet their deadline; off = only max_queue bounds it.
    admission: bool = True
    latency_target_s: float = 0.050
    # Per-caller token buckets (x-shardrec-caller): requests/s and burst for callers not named
    # in caller_limits_file (a TOML file of [callers.NAME] rate_rps / burst); 0 = unlimited.
    caller_rate_rps: float = 0.0
    caller_burst: float = 0.0
    caller_limits_file: str = ""
    # Degraded mode, off by default: under shedding, score only the first N candidates.
    degrade_max_candidates: int = 0
    # Request-time dense values and weights larger than this in magnitude are refused.
    max_abs_dense: float = 1e6
    max_abs_weight: float = 1e6
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()


LOOKUP_MODES = ("shards", "inproc", "redis-kv", "torchrec")
FEATURE_LOSS_MODES = ("fail", "defaults")


def child_env(**overrides: str) -> dict[str, str]:
    """The environment a launched service process inherits, plus ``overrides``."""
    env = dict(os.environ)
    env.update(overrides)
    return env
