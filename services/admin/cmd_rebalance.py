"""``shardrec rebalance show|plan|apply|status|abort``: move a live cluster between shard maps.

The work is ``services.control.rebalance`` (docs/placement.md, "Rebalancing"); this module
parses arguments (``--set TABLE=SHARDING`` pins included), asks for confirmation, and prints.
Handlers run on the CLI's main thread and import the library inside them, so
``shardrec --help`` stays light.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from services.admin.cmd_placement import zk_args
from services.control.rebalance import DEFAULT_NODE_MEMORY_BYTES, DEFAULT_REPLICATE_MAX_BYTES

if TYPE_CHECKING:
    from services.core.placement import TablePlacementSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="move a live cluster to a new shard map (plan, apply, status, abort)")
    s = p.add_subparsers(dest="rebalance_command", metavar="SUBCOMMAND", required=True)

    show = s.add_parser("show", help="per node: partitions held, memory, measured load, live or not")
    zk_args(show)
    show.set_defaults(func=_show)

    plan = s.add_parser(
        "plan",
        help="plan a new shard map and write it to a file (changes nothing)",
        description="Plan the target shard map from the active one, the model's tables and the load the shards "
        "measured; print the moves, the bytes to load and each node's memory and load before and after. Tables "
        "not named by --set keep their sharding, partitions and replicas (only replicas move) unless --rebalance.",
    )
    plan.add_argument("--add-nodes", type=int, default=0, metavar="N", help="add N nodes (ids shard-<k>, the smallest k free)")
    plan.add_argument("--remove-node", action="append", default=[], metavar="ID", help="remove a node (repeatable)")
    plan.add_argument(
        "--set", action="append", default=[], metavar="TABLE=SHARDING",
        help="pin a table: TABLE=replicated[:R], TABLE=table_wise[:R] or TABLE=row_wise:P[:R] (R an integer or 'all'; repeatable)",
    )
    plan.add_argument("--rebalance", action="store_true", help="let the planner reshape every table not pinned, for memory and load")
    plan.add_argument("--out", required=True, help="plan file to write (JSON)")
    plan.add_argument("--node-memory-bytes", type=int, default=DEFAULT_NODE_MEMORY_BYTES, help="embedding bytes each node may hold (default 64 GiB)")
    plan.add_argument("--replicate-max-bytes", type=int, default=DEFAULT_REPLICATE_MAX_BYTES, help="with --rebalance: a table at most this big is replicated (default 1 MiB)")
    plan.add_argument("--min-replicas", type=int, default=2, help="with --rebalance: replicas of every partition at least (default 2)")
    plan.add_argument("--load-tolerance", type=float, default=0.2, help="aim: every node's lookups/s within mean x (1 +- tol) (default 0.2)")
    zk_args(plan)
    plan.set_defaults(func=_plan)

    apply = s.add_parser("apply", help="move the live cluster to a plan's map (resumes a move in progress)")
    apply.add_argument("plan", help="plan file written by `rebalance plan`")
    apply.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    apply.add_argument("--timeout-s", type=float, default=600.0, help="give up waiting after this long (the target stays; 0 = wait forever)")
    zk_args(apply)
    apply.set_defaults(func=_apply)

    status = s.add_parser("status", help="progress of the rebalance in progress, and partitions still draining")
    zk_args(status)
    status.set_defaults(func=_status)

    abort = s.add_parser("abort", help="give up the rebalance in progress (before the switch): delete the target map")
    zk_args(abort)
    abort.set_defaults(func=_abort)


# -- arguments -----------------------------------------------------------------------------------

_SET = re.compile(r"^(?P<table>[^=]+)=(?P<sharding>replicated|table_wise|row_wise)(?::(?P<a>\w+))?(?::(?P<b>\w+))?$")


def parse_set(text: str) -> tuple[str, "TablePlacementSpec"]:
    """``TABLE=replicated[:R]``, ``TABLE=table_wise[:R]`` or ``TABLE=row_wise:P[:R]`` (R an
    integer or ``all``; replicated defaults to all, the others to 1) -> (table, pin)."""
    from services.core.errors import ConfigError
    from services.core.placement import REPLICAS_ALL, TablePlacementSpec
    from services.core.types import ShardingType

    m = _SET.match(text.strip())
    if m is None:
        raise ConfigError(f"--set {text!r}: expected TABLE=replicated[:R], TABLE=table_wise[:R] or TABLE=row_wise:P[:R]")
    sharding, a, b = m["sharding"], m["a"], m["b"]
    entry: dict[str, Any] = {"sharding": sharding}
    if sharding == ShardingType.ROW_WISE.value:
        if a is None or not a.isdigit():
            raise ConfigError(f"--set {text!r}: row_wise needs a partition count, e.g. {m['table']}=row_wise:4")
        entry["partitions"] = int(a)
        replicas = b
    else:
        if b is not None:
            raise ConfigError(f"--set {text!r}: {sharding} takes at most a replica count")
        replicas = a
    if replicas is not None:
        entry["replicas"] = REPLICAS_ALL if replicas == REPLICAS_ALL else _int(replicas, text)
    return m["table"], TablePlacementSpec.from_json(f"--set {text!r}", entry)


def _int(value: str, text: str) -> int:
    from services.core.errors import ConfigError

    if not value.isdigit():
        raise ConfigError(f"--set {text!r}: replicas must be an integer or 'all', got {value!r}")
    return int(value)


# -- handlers ------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.rebalance import read_overview
    from services.control.rebalance_report import format_show

    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        view = read_overview(store)
    print(format_show(args.cluster, view))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.rebalance import plan_rebalance
    from services.control.rebalance_report import format_plan
    from services.core.placement import PlannerConfig
    from services.core.rebalance import PlanRequest

    request = PlanRequest(args.add_nodes, tuple(args.remove_node), tuple(parse_set(x) for x in args.set), args.rebalance)
    config = PlannerConfig(
        replicate_max_bytes=args.replicate_max_bytes, min_replicas=args.min_replicas, load_tolerance=args.load_tolerance
    )
    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        result = plan_rebalance(store, request, node_memory_bytes=args.node_memory_bytes, config=config)
    print(format_plan(result))
    result.plan.save(args.out)
    base = result.active.version
    print(f"\nwrote {args.out} (made against active map version {base}); apply it with: shardrec rebalance apply {args.out}")
    if result.in_progress is not None:
        print(f"note: a rebalance to map version {result.in_progress.version} is in progress; finish or abort it first", file=sys.stderr)
    return 0


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _apply(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.rebalance import apply_plan
    from services.core.errors import ConfigError
    from services.core.rebalance import RebalancePlan

    plan = RebalancePlan.load(args.plan)
    if plan.cluster != args.cluster:
        raise ConfigError(f"{args.plan} was made for cluster {plan.cluster!r}, not {args.cluster!r}")
    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        applied = apply_plan(store, plan, timeout_s=args.timeout_s, confirm=None if args.yes else _confirm)
    return 0 if applied else 1


def _status(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.rebalance import read_status
    from services.control.rebalance_report import format_status

    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        status = read_status(store)
    print(format_status(status))
    return 0


def _abort(args: argparse.Namespace) -> int:
    from services.control.cluster import open_cluster
    from services.control.rebalance import abort_rebalance

    with open_cluster(args.zk, args.cluster, auth_file=args.zk_auth) as (_client, store):
        active, aborted = abort_rebalance(store)
    if aborted is None:
        print(f"no rebalance in progress (active shard map version {active.version}): nothing to abort")
        return 0
    print(f"aborted the rebalance to shard map version {aborted.version}; the active map stays version {active.version}; "
          "nodes drop what they loaded for it after their drain")
    return 0
