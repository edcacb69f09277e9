"""What the planner is given: tables with their load (``TableLoad``), nodes with their memory
(``NodeCapacity``) and its rules (``PlannerConfig``); and the load model of a *unit* (one replica
of one partition). See docs/placement.md ("Planner"). Pure: no torch, no grpc.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import ConfigError
from services.core.placement.spec import TablePlacementSpec
from services.core.types import TableSpec

# Memory of a node whose memory is not a constraint (initial_shard_map); fits numpy int64 sums.
UNBOUNDED_BYTES = 2**62


@dataclass(frozen=True)
class TableLoad:
    """What the planner knows about one table: its size (``spec``: bytes = rows x dim x 4), the
    ids looked up in it per second (measured from shard counters, or expected), and an
    operator's ``pinned`` placement (sharding, partitions and replicas kept exactly)."""

    spec: TableSpec
    lookups_per_s: float
    pinned: TablePlacementSpec | None = None


@dataclass(frozen=True)
class NodeCapacity:
    """One shard node and the embedding bytes it may hold."""

    node_id: str
    memory_bytes: int


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's rules.

    - ``replicate_max_bytes``: a table at most this big is ``replicated`` (a bag pooled in one
      RPC), on ``min_replicas`` nodes, more when it is hot.
    - ``min_replicas``: every partition of an unpinned table is on at least this many nodes
      (fewer only when the cluster has fewer nodes).
    - ``max_partition_bytes``: a table bigger than this is ``row_wise`` with P chosen so every
      partition fits (None: the median node memory / 4).
    - ``load_tolerance``: the plan aims at every node's lookups/s within ``mean x (1 +- tol)``;
      a table is also split (more partitions, or replicas when replicated) until one unit
      carries at most ``tol x`` the mean node load, so a greedy packing can meet the aim.
    - ``keep_shape_load_factor``: an unpinned table keeps its current partition count while
      that still fits ``max_partition_bytes`` and its units carry at most this many times the
      split target (hysteresis: a small change of load does not reshape a table); a
      replicated table keeps its replicas too (within ``[min_replicas, nodes]``), others go
      back to ``min_replicas``.
    """

    replicate_max_bytes: int
    min_replicas: int = 2
    max_partition_bytes: int | None = None
    load_tolerance: float = 0.2
    keep_shape_load_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.replicate_max_bytes < 0:
            raise ConfigError(f"planner: replicate_max_bytes must be >= 0, got {self.replicate_max_bytes}")
        if self.min_replicas < 1:
            raise ConfigError(f"planner: min_replicas must be >= 1, got {self.min_replicas}")
        if self.max_partition_bytes is not None and self.max_partition_bytes < 1:
            raise ConfigError(f"planner: max_partition_bytes must be >= 1, got {self.max_partition_bytes}")
        if not 0 < self.load_tolerance < 1:
            raise ConfigError(f"planner: load_tolerance must be in (0, 1), got {self.load_tolerance}")
        if self.keep_shape_load_factor < 1:
            raise ConfigError(f"planner: keep_shape_load_factor must be >= 1, got {self.keep_shape_load_factor}")


def unit_load(lookups_per_s: float, num_partitions: int, replicas: int) -> float:
    """Lookups/s one *unit* (one replica of one partition) carries: a row-wise partition gets
    lookups/P (row ``r % P`` spreads the hot low ids) and a partition's load splits evenly over
    its R replicas."""
    return lookups_per_s / (num_partitions * replicas)
