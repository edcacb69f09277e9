"""``shardrec rebalance plan --set TABLE=SHARDING``: how the command line spells a table's pin."""

from __future__ import annotations

import pytest

from services.admin.cmd_rebalance import parse_set
from services.core.errors import ConfigError
from services.core.placement import TablePlacementSpec
from services.core.types import ShardingType


@pytest.mark.parametrize("text, table, pin", [
    ("items=replicated", "items", TablePlacementSpec(ShardingType.REPLICATED, 1, "all")),
    ("items=replicated:3", "items", TablePlacementSpec(ShardingType.REPLICATED, 1, 3)),
    ("items=row_wise:4", "items", TablePlacementSpec(ShardingType.ROW_WISE, 4, 1)),
    ("items=row_wise:4:2", "items", TablePlacementSpec(ShardingType.ROW_WISE, 4, 2)),
    ("tags=table_wise", "tags", TablePlacementSpec(ShardingType.TABLE_WISE, 1, 1)),
    ("tags=table_wise:all", "tags", TablePlacementSpec(ShardingType.TABLE_WISE, 1, "all")),
])
def test_parse_set(text, table, pin):
    assert parse_set(text) == (table, pin)


@pytest.mark.parametrize("text, message", [
    ("items", "expected TABLE=replicated"),
    ("items=row_wise", "row_wise needs a partition count"),
    ("items=row_wise:1", "row_wise needs partitions >= 2"),
    ("items=replicated:1", "replicated needs replicas >= 2"),
    ("items=table_wise:2:3", "takes at most a replica count"),
    ("items=replicated:x", "replicas must be an integer or 'all'"),
])
def test_parse_set_refuses(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_set(text)
