"""What one Lookup may ask of a shard (docs/overload.md, "Shard Lookup limits"), checked from
the shapes the request declares, before any of its arrays is copied and before any answer is
allocated: ids and bags summed over every group, and the size of the answer it would build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.core.config import ShardConfig
from services.core.errors import ResourceExhaustedError
from services.core.types import PoolingType

# The largest |weight| a Lookup may carry (fixed: pooled sums of weights beyond it overflow
# float32 long before they mean anything).
MAX_ABS_WEIGHT = 1e6
# Bag groups per Lookup (fixed): a frontend sends one per (feature, partition) it asks this node
# for, tens in practice; each costs Python work however empty it is.
MAX_GROUPS = 10_000
# A LookupRequest's bytes beyond its arrays: per group (table name, tensor headers) and for the
# whole message (request id, versions), upper bounds for ``max_request_bytes``.
_REQUEST_GROUP_BYTES = 256
_REQUEST_MESSAGE_BYTES = 64 << 10
# A LookupResponse's bytes beyond its vectors and counts (tags and lengths): an upper bound per
# group and per message.
_GROUP_OVERHEAD_BYTES = 64
_MESSAGE_OVERHEAD_BYTES = 32
_COUNT_BYTES = 4  # int32 per bag


@dataclass(frozen=True)
class DeclaredGroup:
    """One bag group as its request declares it (shapes checked, data not read yet)."""

    table: str
    partition: int
    pooling: PoolingType
    ids: int
    bags: int
    weighted: bool

    def where(self, index: int) -> str:
        return f"groups[{index}] (table {self.table!r} partition {self.partition})"


def response_bytes(groups: Sequence[DeclaredGroup], dims: Mapping[str, int], itemsize: int) -> int:
    """An upper bound of the LookupResponse's size: per group ``bags x (dim x itemsize + 4)``
    plus framing (an unknown table counts dim 0: it is refused later, before anything is built)."""
    body = sum(g.bags * (dims.get(g.table, 0) * itemsize + _COUNT_BYTES) + _GROUP_OVERHEAD_BYTES for g in groups)
    return body + _MESSAGE_OVERHEAD_BYTES


@dataclass(frozen=True)
class LookupLimits:
    """Caps per Lookup: ids and bags over all groups (``--max-ids``, ``--max-bags``), groups,
    and the answer's bytes (the server's ``--max-message-bytes``). ``max_request_bytes`` is the
    largest request they allow: the server refuses a bigger one before it reaches Python."""

    max_ids: int
    max_bags: int
    max_response_bytes: int
    max_groups: int = MAX_GROUPS

    @classmethod
    def of(cls, config: ShardConfig) -> "LookupLimits":
        return cls(config.max_ids_per_request, config.max_bags_per_request, config.max_message_bytes)

    @property
    def max_request_bytes(self) -> int:
        """Every id with a weight (8 + 4 bytes), every bag (4), every group's and the message's
        framing; never more than the message cap."""
        legal = self.max_ids * 12 + self.max_bags * 4 + self.max_groups * _REQUEST_GROUP_BYTES + _REQUEST_MESSAGE_BYTES
        return min(legal, self.max_response_bytes)

    def check_groups(self, count: int) -> None:
        if count > self.max_groups:
            raise ResourceExhaustedError(f"request carries {count} bag groups, over this node's cap of {self.max_groups}")

    def check(self, groups: Sequence[DeclaredGroup], dims: Mapping[str, int], itemsize: int) -> None:
        """ResourceExhaustedError naming the cap and its flag when the request is over one."""
        self.check_groups(len(groups))
        ids = sum(g.ids for g in groups)
        if ids > self.max_ids:
            raise ResourceExhaustedError(f"request carries {ids} ids, over this node's cap of {self.max_ids} (--max-ids)")
        bags = sum(g.bags for g in groups)
        if bags > self.max_bags:
            raise ResourceExhaustedError(f"request carries {bags} bags, over this node's cap of {self.max_bags} (--max-bags)")
        size = response_bytes(groups, dims, itemsize)
        if size > self.max_response_bytes:
            raise ResourceExhaustedError(
                f"the answer to {bags} bags would take {size} bytes, over this node's cap of {self.max_response_bytes} "
                f"(--max-message-bytes): split the request"
            )
