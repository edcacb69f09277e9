"""``shardrec shard serve``: run one embedding shard node."""

from __future__ import annotations

import argparse

from services.admin.obs_args import add_observability_args, observability_config, setup_logs


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import ShardConfig, default_cluster, default_zk

    p = sub.add_parser("shard", help="embedding shard service")
    s = p.add_subparsers(dest="shard_command", metavar="SUBCOMMAND", required=True)
    serve = s.add_parser("serve", help="serve the partitions the shard map assigns to NODE_ID")
    serve.add_argument("--node-id", required=True, help="stable node id, e.g. shard-0")
    serve.add_argument("--zk", default=default_zk(), help="ZooKeeper hosts (default $SHARDREC_ZK or 127.0.0.1:2181)")
    serve.add_argument("--cluster", default=default_cluster(), help="cluster name (default $SHARDREC_CLUSTER or 'default')")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=0, help="port to bind (0 = any free port)")
    serve.add_argument("--advertise-host", default="", help="host other processes dial (default: --host)")
    serve.add_argument("--torch-threads", type=int, default=1)
    serve.add_argument("--rpc-threads", type=int, default=8)
    serve.add_argument("--max-ids", type=int, default=4_000_000, help="cap on ids per Lookup (RESOURCE_EXHAUSTED above)")
    serve.add_argument("--max-bags", type=int, default=ShardConfig.max_bags_per_request, help="cap on bags per Lookup (RESOURCE_EXHAUSTED above)")
    serve.add_argument("--max-message-bytes", type=int, default=ShardConfig.max_message_bytes, help="cap on a request's and an answer's bytes")
    serve.add_argument("--grace-s", type=float, default=5.0, help="drain period for in-flight calls on SIGTERM")
    serve.add_argument("--session-timeout-s", type=float, default=10.0)
    serve.add_argument("--load-rate-bytes-s", type=int, default=0, help="throttle loading (0 = as fast as the disk)")
    serve.add_argument("--swap-cpu-share", type=_share, default=ShardConfig.swap_cpu_share,
                       help="applying a delta takes at most this share of one core (1 = unpaced; docs/checkpoint.md)")
    serve.add_argument("--version-drain-s", type=float, default=2.0, help="drop a version this long after no frontend serves it")
    serve.add_argument(
        "--partition-drain-s", type=float, default=5.0,
        help="drop a partition this long after no shard map gives it to this node (requests on the old map are served meanwhile)",
    )
    serve.add_argument("--stats-interval-s", type=float, default=5.0, help="publish per-partition load counters in the znode this often")
    serve.add_argument("--no-verify", action="store_true", help="skip sha256 verification of checkpoint files")
    add_observability_args(serve)
    serve.set_defaults(func=_serve)


def _share(raw: str) -> float:
    try:
        share = float(raw)
    except ValueError:
        share = 0.0
    if not share > 0:
        raise argparse.ArgumentTypeError(f"a share of one core must be a number > 0 (1 = unpaced), got {raw!r}")
    return share


def _serve(args: argparse.Namespace) -> int:
    from services.core.config import ShardConfig, ZkConfig

    setup_logs(args, "shard", args.node_id)
    config = ShardConfig(
        node_id=args.node_id,
        zk=ZkConfig(hosts=args.zk, cluster=args.cluster, session_timeout_s=args.session_timeout_s),
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        torch_threads=args.torch_threads,
        rpc_threads=args.rpc_threads,
        max_ids_per_request=args.max_ids,
        max_bags_per_request=args.max_bags,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace_s,
        verify_checksums=not args.no_verify,
        load_rate_bytes_s=args.load_rate_bytes_s,
        swap_cpu_share=args.swap_cpu_share,
        version_drain_s=args.version_drain_s,
        partition_drain_s=args.partition_drain_s,
        stats_interval_s=args.stats_interval_s,
        observability=observability_config(args),
    )
    from services.embedding_shard.main import run

    return run(config)
