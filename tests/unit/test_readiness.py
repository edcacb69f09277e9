"""Readiness (services/core/rpc/readiness.py): named conditions, ready when every one holds."""

from __future__ import annotations

import pytest

from services.core.rpc.readiness import Readiness


def test_readiness_combines_named_conditions() -> None:
    seen: list[bool] = []
    r = Readiness(("loaded", "cluster_view", "feature_store"))
    r.subscribe(seen.append)
    r.set("loaded", True)
    r.set("cluster_view", True)
    assert not r.ready and r.failing() == {"feature_store": "not yet"}
    r.set("feature_store", True)
    r.set("cluster_view", False, "no replica of items/1")
    r.set("cluster_view", False, "no replica of items/0")  # still not ready: no new change
    r.set("cluster_view", True)
    assert seen == [False, True, False, True]
    with pytest.raises(KeyError, match="unknown readiness condition 'featurestore'"):
        r.set("featurestore", True)


def test_readiness_needs_a_condition():
    with pytest.raises(ValueError):
        Readiness(())
