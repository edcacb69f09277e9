"""Who may call what (``services.core.auth``) and files re-read when they change
(``services.core.watched``), table-driven; no server."""

from __future__ import annotations

import os

import pytest

from services.core.auth import Access, AccessPolicy, bearer, hash_token, parse_cluster_tokens, parse_tokens, render_tokens
from services.core.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from services.core.watched import WatchedFiles

TOKENS = parse_tokens(render_tokens([("web-token", "web", False), ("ops-token", "ops", True)]).encode())


def test_tokens_file_maps_hashes_to_callers():
    assert TOKENS[hash_token("web-token")].caller == "web" and not TOKENS[hash_token("web-token")].admin
    assert TOKENS[hash_token("ops-token")].admin
    assert "web-token" not in render_tokens([("web-token", "web", False)])
    for bad in (b'[[token]]\nsha256 = "abc"\ncaller = "x"\n', b'[[token]]\nsha256 = "' + b"a" * 64 + b'"\n', b"[[token"):
        with pytest.raises(ConfigError):
            parse_tokens(bad)


def test_bearer_header():
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None


@pytest.mark.parametrize(
    "access, token, names, want",
    [
        (Access.OPEN, None, (), None),
        (Access.PUBLIC, "web-token", (), "web"),
        (Access.PUBLIC, "ops-token", (), "ops"),
        (Access.PUBLIC, None, (), UnauthenticatedError),
        (Access.PUBLIC, "nope", (), UnauthenticatedError),
        (Access.ADMIN, "ops-token", (), "ops"),
        (Access.ADMIN, "web-token", (), PermissionDeniedError),
        (Access.ADMIN, None, (), UnauthenticatedError),
        (Access.INTERNAL, "cluster-2", (), "frontend"),
        (Access.INTERNAL, "web-token", (), UnauthenticatedError),
        (Access.INTERNAL, None, (), UnauthenticatedError),
    ],
)
def test_policy_with_tokens_and_a_cluster_token(access, token, names, want):
    policy = AccessPolicy(tokens=lambda: TOKENS, cluster_tokens=lambda: ("cluster-1", "cluster-2"))
    if isinstance(want, type):
        with pytest.raises(want):
            policy.admit(access, token, names)
    else:
        assert policy.admit(access, token, names) == want


def test_mtls_lookup_needs_a_frontend_certificate_and_admin_rpcs_are_off_without_tokens():
    policy = AccessPolicy(mtls=True)
    assert policy.admit(Access.INTERNAL, None, ["shardrec-frontend"]) == "frontend"
    with pytest.raises(PermissionDeniedError, match="only frontends"):
        policy.admit(Access.INTERNAL, None, ["shardrec-shard"])
    with pytest.raises(PermissionDeniedError, match="admin RPCs are off"):
        policy.admit(Access.ADMIN, "anything")
    assert AccessPolicy().admit(Access.ADMIN, None) is None and not AccessPolicy().enabled


def test_cluster_token_file_lines():
    assert parse_cluster_tokens(b"new\n\nold\n") == ("new", "old")
    with pytest.raises(ConfigError):
        parse_cluster_tokens(b"\n")


def test_watched_file_rereads_a_change_and_keeps_the_last_good_value(tmp_path):
    now = [0.0]
    path = tmp_path / "tokens"
    path.write_text("a\n")
    files = WatchedFiles([str(path)], lambda c: parse_cluster_tokens(c[0]), poll_s=1.0, clock=lambda: now[0])
    assert files.get() == ("a",) and files.generation == 1
    tmp = tmp_path / "tmp"
    tmp.write_text("b\na\n")
    os.replace(tmp, path)
    assert files.get() == ("a",)  # not polled yet
    now[0] = 1.0
    assert files.get() == ("b", "a") and files.generation == 2
    path.write_text("\n")  # a bad change: ignored
    now[0] = 2.0
    assert files.get() == ("b", "a") and files.generation == 2
    with pytest.raises(ConfigError):
        WatchedFiles([str(tmp_path / "missing")], lambda c: c)


def test_every_znode_kind_has_a_rule_and_the_admin_alone_writes_maps_and_the_model():
    from kazoo.security import Permissions

    from services.core.discovery.acls import TABLE, ZnodeAcls, kind_of
    from services.core.discovery.zk_paths import ZkPaths

    p = ZkPaths("c")
    kinds = {kind_of(x) for x in ("/shardrec", p.base, p.nodes, p.node("s"), p.frontends, p.frontend("f"), p.shardmap_active,
                                   p.shardmap_target, p.model_checkpoint, p.serving_version, p.target_version)}  # fmt: skip
    assert kinds | {"shardmap", "model"} == set(TABLE)
    acls = ZnodeAcls({"admin": ["admin:a"], "shard": ["shard:s"], "frontend": ["frontend:f"]})

    def perms(path, who):
        return sum(a.perms for a in acls.acl_for(path) if a.id.id == who)

    for path in (p.shardmap_active, p.shardmap_target, p.target_version, p.model_checkpoint):
        assert perms(path, "admin:a") == Permissions.ALL
        assert perms(path, "shard:s") == perms(path, "frontend:f") == Permissions.READ
    assert perms(p.serving_version, "frontend:f") == Permissions.READ | Permissions.WRITE
    assert perms(p.nodes, "shard:s") & Permissions.CREATE and not perms(p.nodes, "frontend:f") & Permissions.CREATE
    assert any(a.id.scheme == "auth" and a.perms == Permissions.ALL for a in acls.acl_for(p.node("shard-0")))
