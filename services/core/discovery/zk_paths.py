"""Every ZooKeeper path shardrec uses, spelled here and nowhere else (see docs/zookeeper.md);
what each znode holds is a record of ``records.py``.

    /shardrec/<cluster>/
        nodes/<node_id>          EPHEMERAL  a live shard: NodeRecord (address, partitions, ...)
        frontends/<frontend_id>  EPHEMERAL  a live frontend: FrontendRecord (address, version)
        shardmap/active          the ShardMap requests are routed with (carries the map version)
        shardmap/target          the ShardMap a rebalance moves towards (absent when none)
        model/checkpoint         ModelPointer (uri, name): where every shard reads versions
        model/serving_version    VersionRecord: what frontends serve
        model/target_version     VersionRecord: what shards should load next
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT = "/shardrec"


@dataclass(frozen=True)
class ZkPaths:
    cluster: str

    def __post_init__(self) -> None:
        if not self.cluster or "/" in self.cluster:
            raise ValueError(f"cluster name must be non-empty and contain no '/': {self.cluster!r}")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.cluster}"

    @property
    def nodes(self) -> str:
        return f"{self.base}/nodes"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}/{node_id}"

    @property
    def frontends(self) -> str:
        return f"{self.base}/frontends"

    def frontend(self, frontend_id: str) -> str:
        return f"{self.frontends}/{frontend_id}"

    @property
    def shardmap_active(self) -> str:
        return f"{self.base}/shardmap/active"

    @property
    def shardmap_target(self) -> str:
        return f"{self.base}/shardmap/target"

    @property
    def model_checkpoint(self) -> str:
        return f"{self.base}/model/checkpoint"

    @property
    def serving_version(self) -> str:
        return f"{self.base}/model/serving_version"

    @property
    def target_version(self) -> str:
        return f"{self.base}/model/target_version"
