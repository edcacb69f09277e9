"""Flags shared by several commands: TLS, authentication, Redis AUTH (docs/security.md)."""

from __future__ import annotations

import argparse


def security_args(p: argparse.ArgumentParser, *, shard: bool) -> None:
    p.add_argument("--tls-cert", default="", metavar="PEM", help="this process's certificate: TLS on every port it serves, and its client certificate")
    p.add_argument("--tls-key", default="", metavar="PEM", help="the key of --tls-cert")
    p.add_argument("--tls-ca", default="", metavar="PEM", help="the CA that signs the peers' certificates (with --tls-cert)")
    p.add_argument("--tokens-file", default="", metavar="TOML",
                   help="hashed bearer tokens ([[token]] sha256, caller, admin): "
                   + ("admin RPCs need an admin token" if shard else "Recommend needs a token, admin RPCs an admin token"))
    p.add_argument("--cluster-token-file", default="", metavar="FILE",
                   help="shared secret(s) of frontends and shards, one per line, when TLS is off: "
                   + ("Lookup needs one of them" if shard else "sent on every Lookup (the first line)"))
    if shard:
        p.add_argument("--frontend-cert-names", default="shardrec-frontend", metavar="CN[,CN...]",
                       help="with TLS: the client certificate common names that may call Lookup (default shardrec-frontend)")
    p.add_argument("--secrets-poll-s", type=float, default=1.0, help="how often token and certificate files are checked for a change")


def security_config(args: argparse.Namespace):  # noqa: ANN201 - (TlsConfig, AuthConfig)
    from services.core.config import AuthConfig, TlsConfig

    tls = TlsConfig(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca, poll_s=args.secrets_poll_s)
    names = tuple(n.strip() for n in getattr(args, "frontend_cert_names", "shardrec-frontend").split(",") if n.strip())
    auth = AuthConfig(tokens_file=args.tokens_file, cluster_token_file=args.cluster_token_file, frontend_names=names, poll_s=args.secrets_poll_s)
    return tls, auth


def redis_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-password-file", default="", metavar="FILE",
                   help="Redis AUTH password, the file's first line (default: $SHARDREC_REDIS_PASSWORD, else none)")
    p.add_argument("--redis-ca", default="", metavar="PEM", help="with a rediss:// URL: the CA of the Redis server's certificate")


def redis_auth_config(args: argparse.Namespace):  # noqa: ANN201 - RedisAuth
    from services.core.config import redis_auth

    return redis_auth(args.redis_password_file, args.redis_ca)
