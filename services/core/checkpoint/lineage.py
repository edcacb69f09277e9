"""Which model version may follow which (docs/checkpoint.md, "Serving a new version").

The lineage rules, written once. A **chain** is what ``CheckpointReader.chain`` resolves a
version to, as versions: ``(base, delta, ..., version)``; a base's chain is itself alone.

- ``check_publish``: what an operator may publish next: a base, or a delta whose parent is the
  version the cluster serves.
- ``check_rollback``: what an operator may roll back to: the serving version or one of its
  ancestors.
- ``check_follow``: what a shard accepts as its target: a base, a version that descends from
  the serving one (a chain of deltas over it, so a publish the shard saw late), or an ancestor
  of it (a rollback). A delta of another branch (built on a version that was rolled back away
  from) is refused.

Pure module: versions in, an error out (no I/O, no torch, no grpc).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.core.errors import CheckpointError, FailedPreconditionError
from services.core.types import Version

Chain = Sequence[Version]


def is_base(chain: Chain) -> bool:
    """True when the chain is a base alone."""
    return len(chain) == 1


def parent(chain: Chain) -> Version | None:
    """The parent of the chain's last version (None for a base)."""
    return None if is_base(chain) else chain[-2]


def descends_from(chain: Chain, ancestor: Version) -> bool:
    """True when ``ancestor`` is on the chain (a version descends from itself)."""
    return ancestor in chain


def check_publish(chain: Chain, serving: Version) -> None:
    """A base, or a delta whose parent is ``serving``; FailedPreconditionError otherwise."""
    version = chain[-1]
    if not is_base(chain) and parent(chain) != serving:
        raise FailedPreconditionError(
            f"version {version} is a delta of version {parent(chain)}, but the cluster serves version {serving}: "
            f"publish a delta whose parent is {serving}"
        )


def check_rollback(version: Version, serving_chain: Chain) -> None:
    """``version`` is the serving version or one of its ancestors; FailedPreconditionError
    otherwise (the serving version is the last of ``serving_chain``)."""
    if not descends_from(serving_chain, version):
        serving = serving_chain[-1]
        raise FailedPreconditionError(
            f"version {version} is not an ancestor of the serving version {serving} (its chain is {list(serving_chain)}); "
            f"publish it instead if it is a delta of {serving}"
        )


def check_follow(target_chain: Chain, serving_chain: Chain | None) -> None:
    """A shard may move from the serving version to the target: a base, a descendant or an
    ancestor of the serving version (``serving_chain`` None: nothing served yet, anything
    goes). CheckpointError naming both chains otherwise."""
    if is_base(target_chain) or not serving_chain:
        return
    target, serving = target_chain[-1], serving_chain[-1]
    if not descends_from(target_chain, serving) and not descends_from(serving_chain, target):
        raise CheckpointError(
            f"version {target} is a delta of {parent(target_chain)} (chain {list(target_chain)}) but the serving version "
            f"{serving} (chain {list(serving_chain)}) is not among its ancestors: publish a delta whose parent is {serving}"
        )
