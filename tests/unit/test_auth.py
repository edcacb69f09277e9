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
