"""Frozen configuration per process. The ONLY module that reads environment variables.

Every value has a flag; an environment variable gives the flag's default (``SHARDREC_ZK``,
``SHARDREC_CLUSTER``, ...), so containers can be configured without flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def default_zk() -> str:
    return env_str("SHARDREC_ZK", "127.0.0.1:2181")


def default_cluster() -> str:
    return env_str("SHARDREC_CLUSTER", "default")


@dataclass(frozen=True)
class ZkConfig:
    hosts: str
    cluster: str
    session_timeout_s: float = 10.0
    connect_timeout_s: float = 15.0


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics, traces and logs of one process (docs/observability.md)."""

    metrics_port: int | None = None  # HTTP /metrics port; None = no endpoint (0 = any free port)
    metrics_host: str = "127.0.0.1"
    trace_sample: float = 0.01  # head sampling of root spans (with an exporter configured)
    otlp_endpoint: str = ""  # OTLP/gRPC collector host:port; "" = none
    trace_file: str = ""  # JSON-lines span file (tests, debugging); "" = none
    log_format: str = "text"  # "text" or "json"

    @property
    def metrics(self) -> bool:
        return self.metrics_port is not None


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
    # Applying a delta (verify, read, write in place) takes at most this share of one core, so
    # serving on the node barely notices a swap (docs/checkpoint.md, "Paced swaps"); 1 = unpaced.
    swap_cpu_share: float = 0.25
    # A version no live frontend serves any more is dropped this long after it became unused.
    version_drain_s: float = 2.0
    # A partition no shard map gives this node any more is dropped this long after that
    # (requests routed with the previous map are served meanwhile).
    partition_drain_s: float = 5.0
    # How often the per-partition load counters are sampled and published in the znode.
    stats_interval_s: float = 5.0
    observability: ObservabilityConfig = ObservabilityConfig()


@dataclass(frozen=True)
class FrontendConfig:
    """One frontend process."""

    frontend_id: str
    zk: ZkConfig | None  # None with ``inproc``
    redis_url: str = ""  # "" = no stored features (every user and item gets defaults)
    redis_prefix: str = ""
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
    max_message_bytes: int = 256 * 1024 * 1024
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
    observability: ObservabilityConfig = ObservabilityConfig()


LOOKUP_MODES = ("shards", "inproc", "redis-kv", "torchrec")
FEATURE_LOSS_MODES = ("fail", "defaults")


def child_env(**overrides: str) -> dict[str, str]:
    """The environment a launched service process inherits, plus ``overrides``."""
    env = dict(os.environ)
    env.update(overrides)
    return env
