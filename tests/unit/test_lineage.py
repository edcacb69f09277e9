"""The lineage rules (``core.checkpoint.lineage``), table-driven over version chains."""

from __future__ import annotations

import pytest

from services.core.checkpoint import lineage
from services.core.errors import CheckpointError, FailedPreconditionError

# Versions: 1 base; 2 on 1; 3 on 2; 4 on 1 (a branch after a rollback to 1); 5 a new base.
CHAINS = {1: (1,), 2: (1, 2), 3: (1, 2, 3), 4: (1, 4), 5: (5,)}


@pytest.mark.parametrize("target, serving, ok", [
    (2, 1, True),    # a delta of the serving version
    (5, 3, True),    # a new base, whatever is served
    (3, 1, False),   # a delta of a delta: its parent is not served
    (4, 2, False),   # another branch
])
def test_publish(target, serving, ok):
    if ok:
        lineage.check_publish(CHAINS[target], serving)
    else:
        with pytest.raises(FailedPreconditionError, match=f"publish a delta whose parent is {serving}"):
            lineage.check_publish(CHAINS[target], serving)


@pytest.mark.parametrize("target, serving, ok", [(1, 3, True), (2, 3, True), (3, 3, True), (4, 3, False), (5, 3, False)])
def test_rollback(target, serving, ok):
    if ok:
        lineage.check_rollback(target, CHAINS[serving])
    else:
        with pytest.raises(FailedPreconditionError, match=f"not an ancestor of the serving version {serving}"):
            lineage.check_rollback(target, CHAINS[serving])


@pytest.mark.parametrize("target, serving, ok", [
    (2, 1, True),     # one delta on
    (3, 1, True),     # several deltas on (a publish seen late)
    (1, 3, True),     # a rollback to an ancestor
    (5, 3, True),     # a new base
    (3, None, True),  # nothing served yet
    (4, 2, False),    # a delta of another branch
    (3, 4, False),
])
def test_follow(target, serving, ok):
    serving_chain = None if serving is None else CHAINS[serving]
    if ok:
        lineage.check_follow(CHAINS[target], serving_chain)
    else:
        with pytest.raises(CheckpointError, match="is not among its ancestors"):
            lineage.check_follow(CHAINS[target], serving_chain)
