"""ZooKeeper ACLs: THE table of who may write each znode (docs/security.md, "ZooKeeper ACLs").

With credentials configured (``ZkConfig.auth``), every znode is created with the ACL of its
kind, znode by znode: ``services.core.clients.make_kazoo`` asks ``ZnodeAcls.acl_for(path)`` on
every create, parents made by ``makepath`` included. Every role of the cluster reads every
znode; the admin identity may do anything (and change ACLs); besides:

    znode kind          written by           children created / deleted by
    /shardrec           admin                admin
    cluster base        admin                admin
    nodes/              admin                admin, shards
    nodes/<id>          the shard itself     -
    frontends/          admin                admin, frontends
    frontends/<id>      the frontend itself  -
    shardmap/           admin                admin
    shardmap/active     admin                -
    shardmap/target     admin                -
    model/              admin                admin
    model/checkpoint    admin                -
    model/serving_version  admin, frontends  -
    model/target_version   admin             -

"The shard itself" is the creating session's identity (ZooKeeper's ``auth`` scheme): with one
ZooKeeper user per shard (``digests.shard`` lists them all), no shard can change another's
znode. ACLs are set when a znode is created: ``shardrec placement init`` creates the tree;
znodes made before credentials were configured keep their open ACL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from posixpath import dirname

from services.core.discovery.zk_paths import ROOT, ZkPaths

ADMIN, SHARD, FRONTEND = "admin", "shard", "frontend"
ROLES = (ADMIN, SHARD, FRONTEND)
CREATOR = "creator"  # the identity of the session that creates the znode

# kind -> (roles that write its data, roles that create and delete its children)
TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "root": ((ADMIN,), (ADMIN,)),
    "cluster": ((ADMIN,), (ADMIN,)),
    "nodes": ((ADMIN,), (ADMIN, SHARD)),
    "node": ((CREATOR,), ()),
    "frontends": ((ADMIN,), (ADMIN, FRONTEND)),
    "frontend": ((CREATOR,), ()),
    "shardmap": ((ADMIN,), (ADMIN,)),
    "shardmap_active": ((ADMIN,), ()),
    "shardmap_target": ((ADMIN,), ()),
    "model": ((ADMIN,), (ADMIN,)),
    "model_checkpoint": ((ADMIN,), ()),
    "model_serving": ((ADMIN, FRONTEND), ()),
    "model_target": ((ADMIN,), ()),
}


def kind_of(path: str) -> str:
    """The table's kind of ``path`` (an unknown znode under a cluster is ``cluster``: admin only)."""
    if path.rstrip("/") == ROOT:
        return "root"
    parts = path.split("/")
    if len(parts) < 3 or f"/{parts[1]}" != ROOT:
        return "root"
    p = ZkPaths(parts[2])
    exact = {
        p.base: "cluster", p.nodes: "nodes", p.frontends: "frontends",
        dirname(p.shardmap_active): "shardmap", p.shardmap_active: "shardmap_active", p.shardmap_target: "shardmap_target",
        dirname(p.model_checkpoint): "model", p.model_checkpoint: "model_checkpoint", p.serving_version: "model_serving",
        p.target_version: "model_target",
    }  # fmt: skip
    if path in exact:
        return exact[path]
    parent = dirname(path)
    return {p.nodes: "node", p.frontends: "frontend"}.get(parent, "cluster")


class ZnodeAcls:
    """ACLs from the table for one cluster's roles: ``digests`` maps each role to the digest
    ids (``user:base64(sha1(user:password))``, kazoo's ``make_digest_acl_credential``) of its
    ZooKeeper users. kazoo is imported inside."""

    def __init__(self, digests: Mapping[str, Sequence[str]]) -> None:
        self.digests = {role: tuple(digests.get(role, ())) for role in ROLES}

    def acl_for(self, path: str) -> list:
        from kazoo.security import ACL, Id, Permissions

        write, children = TABLE[kind_of(path)]
        perms: dict[tuple[str, str], int] = {}

        def grant(scheme: str, ident: str, p: int) -> None:
            perms[(scheme, ident)] = perms.get((scheme, ident), 0) | p

        for role in ROLES:
            for ident in self.digests[role]:
                grant("digest", ident, Permissions.READ)
                if role == ADMIN:
                    grant("digest", ident, Permissions.ALL)
                if role in write:
                    grant("digest", ident, Permissions.WRITE)
                if role in children:
                    grant("digest", ident, Permissions.CREATE | Permissions.DELETE)
        if CREATOR in write:
            grant("auth", "", Permissions.ALL)
        return [ACL(p, Id(scheme, ident)) for (scheme, ident), p in perms.items()]
