"""Who may call what (docs/security.md): bearer tokens, the cluster token, certificate names.

Pure (no grpc): ``AccessPolicy.admit(kind, token, peer_names)`` decides one call and returns
the caller's identity, or raises UnauthenticatedError / PermissionDeniedError.
``services.core.rpc.auth`` applies it to every gRPC call, the REST endpoint to every request.

- **Caller and admin tokens** (``--tokens-file``): a TOML file of hashed tokens, each naming
  the caller identity the per-caller limits apply to, and whether it is an admin token::

      [[token]]
      sha256 = "9f86d0...0f00a08"   # sha256 hex of the token; the token itself is never stored
      caller = "web"
      admin = false

  sha256 and not a KDF: tokens are 32 random bytes (``new_token``), out of reach of a
  brute-force search, so a deliberately slow hash would only add its cost to every call.
- **Cluster token** (``--cluster-token-file``): a shared secret, one per line, that frontends
  send on Lookup when TLS is off; a shard accepts every line (add the new one, switch the
  frontends, then remove the old: rotation without a refused call), a frontend sends the first.
- **Certificate names**: with TLS on, a shard takes Lookup only from a client certificate whose
  common name is one of ``frontend_names``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.core.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

if TYPE_CHECKING:
    from services.core.config import AuthConfig

ANONYMOUS = "anonymous"


class Access(enum.Enum):
    """What a method needs."""

    OPEN = "open"  # health: anyone
    PUBLIC = "public"  # Recommend: a caller token when tokens are on
    INTERNAL = "internal"  # Lookup: a frontend (certificate name, or the cluster token)
    ADMIN = "admin"  # GetStats, Describe, reflection: an admin token when authentication is on


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenGrant:
    caller: str
    admin: bool = False


def parse_tokens(raw: bytes, where: str = "tokens file") -> dict[str, TokenGrant]:
    """sha256 hex -> grant, from the TOML tokens file (ConfigError naming the bad entry)."""
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{where}: {e}") from e
    out: dict[str, TokenGrant] = {}
    for i, entry in enumerate(doc.get("token", [])):
        digest, caller = entry.get("sha256"), entry.get("caller")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: token[{i}].sha256 must be 64 lowercase hex digits")
        if not isinstance(caller, str) or not caller or not caller.isprintable() or len(caller) > 128:
            raise ConfigError(f"{where}: token[{i}].caller must be 1 to 128 printable characters")
        out[digest] = TokenGrant(caller, bool(entry.get("admin", False)))
    return out


def render_tokens(grants: Iterable[tuple[str, str, bool]]) -> str:
    """The tokens file for ``(token, caller, admin)`` triples (hashes only)."""
    return "".join(
        f'[[token]]\nsha256 = "{hash_token(t)}"\ncaller = "{caller}"\nadmin = {str(admin).lower()}\n\n' for t, caller, admin in grants
    )


def parse_cluster_tokens(raw: bytes, where: str = "cluster token file") -> tuple[str, ...]:
    """The cluster token file's secrets, one per non-empty line (the first is the one sent)."""
    tokens = tuple(line.strip() for line in raw.decode().splitlines() if line.strip())
    if not tokens:
        raise ConfigError(f"{where}: no token in it")
    return tokens


def bearer(value: str | None) -> str | None:
    """The token of an ``authorization`` value ``Bearer T`` (None when absent or not bearer)."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class AccessPolicy:
    """Decides calls. ``tokens()`` and ``cluster_tokens()`` return the current files' contents
    (None when that kind of authentication is off; reloaded by their owners, see
    ``services.core.watched``); ``mtls``: client certificates are verified, and Lookup needs a
    name in ``frontend_names``. Thread-safe (it only reads)."""

    def __init__(
        self,
        *,
        tokens: Callable[[], dict[str, TokenGrant]] | None = None,
        cluster_tokens: Callable[[], tuple[str, ...]] | None = None,
        mtls: bool = False,
        frontend_names: Iterable[str] = ("shardrec-frontend",),
    ) -> None:
        self._tokens = tokens
        self._cluster_tokens = cluster_tokens
        self.mtls = mtls
        self.frontend_names = frozenset(frontend_names)

    @property
    def enabled(self) -> bool:
        """Whether anything is checked at all (off: every call is admitted, as before)."""
        return self._tokens is not None or self._cluster_tokens is not None or self.mtls

    @property
    def tokens_on(self) -> bool:
        return self._tokens is not None

    def admit(self, access: Access, token: str | None, peer_names: Iterable[str] = ()) -> str | None:
        """The caller identity of an admitted call (None: not known from credentials; the
        caller's declared identity applies), or UnauthenticatedError / PermissionDeniedError."""
        if access is Access.OPEN or not self.enabled:
            return None
        if access is Access.PUBLIC:
            return self._grant(token).caller if self._tokens is not None else None
        if access is Access.ADMIN:
            if self._tokens is None:
                raise PermissionDeniedError("admin RPCs are off on this server: start it with --tokens-file holding an admin token")
            grant = self._grant(token)
            if not grant.admin:
                raise PermissionDeniedError(f"caller {grant.caller!r} may not call admin RPCs (an admin token is needed)")
            return grant.caller
        return self._frontend(token, peer_names)

    def _grant(self, token: str | None) -> TokenGrant:
        if token is None:
            raise UnauthenticatedError("no bearer token: send 'authorization: Bearer <token>'")
        grant = self._tokens().get(hash_token(token)) if self._tokens is not None else None
        if grant is None:
            raise UnauthenticatedError("unknown bearer token")
        return grant

    def _frontend(self, token: str | None, peer_names: Iterable[str]) -> str:
        if self.mtls:
            names = set(peer_names)
            if names & self.frontend_names:
                return "frontend"
            raise PermissionDeniedError(
                f"only frontends may call Lookup: the client certificate names {sorted(names) or 'nothing'}, "
                f"not one of {sorted(self.frontend_names)}"
            )
        if self._cluster_tokens is None:
            return "frontend"
        if token is None:
            raise UnauthenticatedError("no cluster token: only frontends may call Lookup")
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self._cluster_tokens()):
            raise UnauthenticatedError("unknown cluster token: only frontends may call Lookup")
        return "frontend"


def access_policy(config: "AuthConfig", *, mtls: bool) -> AccessPolicy:
    """The policy of a server from its config: the files read now (ConfigError when one is
    missing or bad) and re-read when they change."""
    from services.core.watched import WatchedFiles

    tokens = cluster = None
    if config.tokens_file:
        files = WatchedFiles([config.tokens_file], lambda c: parse_tokens(c[0], config.tokens_file), poll_s=config.poll_s)
        tokens = files.get
    if config.cluster_token_file:
        files_c = WatchedFiles(
            [config.cluster_token_file], lambda c: parse_cluster_tokens(c[0], config.cluster_token_file), poll_s=config.poll_s
        )
        cluster = files_c.get
    return AccessPolicy(tokens=tokens, cluster_tokens=cluster, mtls=mtls, frontend_names=config.frontend_names)


def cluster_token_sender(config: "AuthConfig") -> Callable[[], str] | None:
    """What a frontend sends on Lookup: the first line of the cluster token file, kept current
    (None when there is no cluster token)."""
    if not config.cluster_token_file:
        return None
    from services.core.watched import WatchedFiles

    files = WatchedFiles(
        [config.cluster_token_file], lambda c: parse_cluster_tokens(c[0], config.cluster_token_file), poll_s=config.poll_s
    )
    return lambda: files.get()[0]
