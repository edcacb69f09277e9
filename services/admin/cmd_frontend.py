"""``shardrec frontend serve``: run one Recommend frontend."""

from __future__ import annotations

import argparse

from services.admin.flags import redis_auth_args, redis_auth_config, security_args, security_config


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import FEATURE_LOSS_MODES, LOOKUP_MODES, default_cluster, default_zk, default_zk_auth_file

    p = sub.add_parser("frontend", help="Recommend frontend service")
    s = p.add_subparsers(dest="frontend_command", metavar="SUBCOMMAND", required=True)
    serve = s.add_parser("serve", help="serve Recommend over the cluster's shards (or a baseline: --lookup)")
    serve.add_argument("--zk", default=default_zk(), help="ZooKeeper hosts (default $SHARDREC_ZK or 127.0.0.1:2181)")
    serve.add_argument("--cluster", default=default_cluster(), help="cluster name (default $SHARDREC_CLUSTER or 'default')")
    serve.add_argument("--zk-auth", default=default_zk_auth_file(), metavar="TOML",
                       help="ZooKeeper credentials and the roles' digests: znodes get ACLs (docs/security.md; default $SHARDREC_ZK_AUTH)")
    serve.add_argument("--redis", default="", help="Redis URL of the stored features, e.g. redis://127.0.0.1:6379/0 "
                       "or redis+sentinel://host:port[,host:port...]/master[/db]")
    serve.add_argument("--redis-prefix", default="", help="key prefix of the stored features")
    serve.add_argument("--redis-timeout-ms", type=float, default=200.0,
                       help="ceiling of one feature store read (a batch's deadline may cut it shorter)")
    serve.add_argument("--on-feature-loss", choices=FEATURE_LOSS_MODES, default="fail",
                       help="while the feature store is lost or unreachable: fail (UNAVAILABLE, default) or defaults "
                       "(every stored feature at its default, the answer flagged degraded)")
    serve.add_argument("--feature-sync", choices=("on", "off"), default="on",
                       help="reload a lost feature store from the checkpoint's feature files (one frontend at a time)")
    serve.add_argument("--features", default="", metavar="ROOT",
                       help="where that reload finds features/{users,items}.npz (default: the served checkpoint's root)")
    serve.add_argument("--feature-check-ms", type=float, default=1000.0,
                       help="read the feature store's marker when no batch did for this long")
    serve.add_argument("--frontend-id", default="", help="id in ZooKeeper (default frontend-<host>-<pid>)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (:: = every IPv6 and IPv4 address)")
    serve.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    serve.add_argument("--advertise-host", default="", help="host other processes dial (default: --host)")
    serve.add_argument("--http-port", type=int, default=None, metavar="PORT",
                       help="serve REST/JSON (POST /v1/recommend, /healthz, /readyz, /openapi.json) on this port; 0 = any free port (default: off)")
    serve.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                       help="receive cap of a Recommend (gRPC message or REST body; default 4 MiB)")
    serve.add_argument("--inproc", action="store_true", help="the monolith: every table in this process, no shards (= --lookup inproc)")
    serve.add_argument(
        "--lookup",
        choices=LOOKUP_MODES,
        default=None,
        help="the lookup step: shards (default: the cluster in ZooKeeper) or a comparison baseline that "
        "takes the model from --checkpoint: inproc (the monolith), redis-kv (rows in Redis, pipelined MGET, "
        "pooled here; load them with 'shardrec bench load-kv'), torchrec (EmbeddingBagCollection; optional install)",
    )
    serve.add_argument("--checkpoint", default="", help="checkpoint URI (with --lookup inproc, redis-kv or torchrec)")
    serve.add_argument("--kv-redis", default="", metavar="URL", help="redis-kv: Redis holding the rows (default: --redis)")
    serve.add_argument("--kv-prefix", default="kv:", help="redis-kv: key prefix of the rows (default 'kv:')")
    serve.add_argument("--max-batch", type=int, default=64, help="requests per micro-batch at most")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch may wait for more requests while another is in flight")
    serve.add_argument("--max-queue", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-candidates", type=int, default=1000)
    serve.add_argument("--default-timeout-ms", type=float, default=1000.0, help="deadline of a call that has none")
    serve.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    serve.add_argument("--torch-threads", type=int, default=1)
    serve.add_argument("--grace-s", type=float, default=5.0, help="at shutdown, how long in-flight calls may take to finish")
    serve.add_argument("--lame-duck-s", type=float, default=1.0,
                       help="at shutdown, how long health says NOT_SERVING while calls are still taken (callers move away)")
    serve.add_argument("--session-timeout-s", type=float, default=10.0)
    serve.add_argument("--eject-s", type=float, default=1.0, help="first ejection of a shard that errors or times out; doubles per failure in a row")
    serve.add_argument("--eject-max-s", type=float, default=10.0, help="longest ejection")
    serve.add_argument(
        "--hedge-delay-ms",
        type=_hedge_delay,
        default=None,
        metavar="MS|p95",
        help="send a late shard call to another replica too after this long: p95 (default: the node's recent "
        "p95, at least --hedge-min-delay-ms), a fixed delay, or 0 = no hedging",
    )
    serve.add_argument("--hedge-min-delay-ms", type=float, default=2.0, help="floor of the p95 hedge delay")
    serve.add_argument("--hedge-budget", type=float, default=0.05, help="hedge RPCs per Lookup RPC at most (0 = no hedging)")
    serve.add_argument("--admission", choices=("on", "off"), default="on",
                       help="admission control: refuse at once what would queue past the latency target or the deadline (docs/overload.md)")
    serve.add_argument("--latency-target-ms", type=float, default=50.0,
                       help="latency the adaptive concurrency limit holds for admitted requests, whatever the callers' deadlines")
    serve.add_argument("--caller-rate-rps", type=float, default=0.0,
                       help="requests/s per caller identity (x-shardrec-caller) not named in --caller-limits; 0 = unlimited")
    serve.add_argument("--caller-burst", type=float, default=0.0, help="burst per caller (default: one second of --caller-rate-rps)")
    serve.add_argument("--caller-limits", default="", metavar="TOML", help="per-caller rates: [callers.NAME] rate_rps = R, burst = B")
    serve.add_argument("--degrade-max-candidates", type=int, default=0,
                       help="degraded mode under shedding: score only the first N candidates of a request (0 = off)")
    serve.add_argument("--max-abs-dense", type=float, default=1e6, help="largest magnitude of a request-time dense value")
    serve.add_argument("--max-abs-weight", type=float, default=1e6, help="largest magnitude of a request-time sparse weight")
    security_args(serve, shard=False)
    redis_auth_args(serve)
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    serve.set_defaults(func=_serve)


def _hedge_delay(raw: str) -> float | None:
    """'p95' (the node's recent p95) -> None; milliseconds -> seconds."""
    if raw.strip().lower() == "p95":
        return None
    ms = float(raw)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"hedge delay must be p95, 0 or a positive number of ms, got {raw!r}")
    return ms / 1000.0


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import socket

    from services.core.config import FrontendConfig, ZkConfig, load_zk_auth
    from services.core.errors import ConfigError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.inproc and args.lookup not in (None, "inproc"):
        raise ConfigError(f"--inproc means --lookup inproc; it cannot go with --lookup {args.lookup}")
    lookup = "inproc" if args.inproc else (args.lookup or "shards")
    if args.inproc and not args.checkpoint:
        raise ConfigError("--inproc needs --checkpoint URI")
    if lookup != "shards" and not args.checkpoint:
        raise ConfigError(f"--lookup {lookup} needs --checkpoint URI")
    if not 0.0 <= args.hedge_budget <= 1.0:
        raise ConfigError(f"--hedge-budget must be between 0 and 1 (hedge RPCs per Lookup RPC), got {args.hedge_budget}")
    if args.eject_s <= 0 or args.eject_max_s < args.eject_s:
        raise ConfigError(f"--eject-s must be > 0 and --eject-max-s at least --eject-s, got {args.eject_s} and {args.eject_max_s}")
    if args.latency_target_ms <= 0:
        raise ConfigError(f"--latency-target-ms must be > 0, got {args.latency_target_ms}")
    if args.caller_rate_rps < 0 or args.caller_burst < 0 or args.degrade_max_candidates < 0:
        raise ConfigError("--caller-rate-rps, --caller-burst and --degrade-max-candidates must be >= 0")
    if args.max_abs_dense <= 0 or args.max_abs_weight <= 0:
        raise ConfigError("--max-abs-dense and --max-abs-weight must be > 0")
    if args.redis_timeout_ms <= 0 or args.feature_check_ms <= 0:
        raise ConfigError("--redis-timeout-ms and --feature-check-ms must be > 0")
    kv_redis = args.kv_redis or args.redis
    if lookup == "redis-kv" and not kv_redis:
        raise ConfigError("--lookup redis-kv needs --kv-redis URL (or --redis URL) of the Redis holding the rows")
    tls, auth = security_config(args)
    config = FrontendConfig(
        frontend_id=args.frontend_id or f"frontend-{socket.gethostname()}-{os.getpid()}",
        zk=None if lookup != "shards" else ZkConfig(hosts=args.zk, cluster=args.cluster, session_timeout_s=args.session_timeout_s, auth=load_zk_auth(args.zk_auth)),
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        redis_auth=redis_auth_config(args),
        redis_timeout_s=args.redis_timeout_ms / 1000.0,
        on_feature_loss=args.on_feature_loss,
        feature_sync=args.feature_sync == "on",
        feature_check_s=args.feature_check_ms / 1000.0,
        features_root=args.features,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        http_port=args.http_port,
        max_request_bytes=args.max_request_bytes,
        inproc_checkpoint=args.checkpoint if lookup == "inproc" else "",
        max_batch=args.max_batch,
        max_wait_s=args.max_wait_ms / 1000.0,
        max_queue=args.max_queue,
        max_candidates=args.max_candidates,
        default_timeout_s=args.default_timeout_ms / 1000.0,
        device=args.device,
        torch_threads=args.torch_threads,
        grace_s=args.grace_s,
        lame_duck_s=args.lame_duck_s,
        lookup=lookup,
        checkpoint=args.checkpoint if lookup != "shards" else "",
        kv_redis_url=kv_redis if lookup == "redis-kv" else "",
        kv_prefix=args.kv_prefix,
        eject_s=args.eject_s,
        eject_max_s=args.eject_max_s,
        hedge_delay_s=args.hedge_delay_ms,
        hedge_min_delay_s=args.hedge_min_delay_ms / 1000.0,
        hedge_budget=args.hedge_budget,
        admission=args.admission == "on",
        latency_target_s=args.latency_target_ms / 1000.0,
        caller_rate_rps=args.caller_rate_rps,
        caller_burst=args.caller_burst,
        caller_limits_file=args.caller_limits,
        degrade_max_candidates=args.degrade_max_candidates,
        max_abs_dense=args.max_abs_dense,
        max_abs_weight=args.max_abs_weight,
        tls=tls,
        auth=auth,
    )
    from services.frontend.main import run

    return run(config)
