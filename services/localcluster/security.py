"""Security of a local cluster (docs/security.md): ``--tls`` makes a local CA and the role
certificates under ``<workdir>/pki`` (``certs.LocalPki``); ``--auth`` writes the secrets under
``<workdir>/secrets`` (mode 0600): the hashed tokens file the servers read, the plain tokens the
demo and the tests send (a caller ``demo`` and an admin), and the cluster token of frontends and
shards (when TLS is off; with TLS the shards check the frontend's certificate).
``LocalSecurity`` turns them into each process's flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from services.core.auth import new_token, render_tokens
from services.core.discovery.acls import ADMIN as ADMIN_ROLE
from services.core.discovery.acls import ROLES
from services.localcluster.certs import LocalPki
from services.localcluster.config import LocalClusterConfig

CALLER = "demo"
ADMIN = "admin"


def write_secret(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class LocalSecrets:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def tokens_file(self) -> Path:
        return self.root / "tokens.toml"

    @property
    def caller_token_file(self) -> Path:
        return self.root / "caller.token"

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin.token"

    @property
    def cluster_token_file(self) -> Path:
        return self.root / "cluster.token"

    @property
    def redis_password_file(self) -> Path:
        return self.root / "redis.password"

    def zk_auth_file(self, user: str) -> Path:
        """The ZooKeeper credentials of ``user``: admin, frontend, or a shard's node id."""
        return self.root / f"zk-{user}.toml"

    def create(self, *, cluster_token: bool, shard_users: Sequence[str]) -> "LocalSecrets":
        """Fresh secrets; ``shard_users``: the shards' ZooKeeper users (one per node id, so no
        shard can write another's znode, or one shared user where a node cannot be given its
        own file, as in a Kubernetes StatefulSet)."""
        caller, admin = new_token(), new_token()
        write_secret(self.caller_token_file, caller + "\n")
        write_secret(self.admin_token_file, admin + "\n")
        write_secret(self.tokens_file, render_tokens([(caller, CALLER, False), (admin, ADMIN, True)]))
        if cluster_token:
            write_secret(self.cluster_token_file, new_token() + "\n")
        write_secret(self.redis_password_file, new_token() + "\n")
        from kazoo.security import make_digest_acl_credential

        users = {ADMIN_ROLE: ["admin"], "frontend": ["frontend"], "shard": list(shard_users)}
        passwords = {user: new_token() for role in ROLES for user in users[role]}
        digests = "".join(
            f"{role} = [{', '.join(repr(make_digest_acl_credential(u, passwords[u])) for u in users[role])}]\n" for role in ROLES
        ).replace("'", '"')
        for user, pw in passwords.items():
            write_secret(self.zk_auth_file(user), f'user = "{user}"\npassword = "{pw}"\n\n[digests]\n{digests}')
        return self

    def server_flags(self, role: str, user: str) -> list[str]:
        """``--tokens-file``, ``--cluster-token-file`` (when there is one), ``--zk-auth`` of
        ``user`` and, for a frontend, ``--redis-password-file``."""
        flags = ["--tokens-file", str(self.tokens_file), "--zk-auth", str(self.zk_auth_file(user))]
        if self.cluster_token_file.exists():
            flags += ["--cluster-token-file", str(self.cluster_token_file)]
        if role == "frontend":
            flags += ["--redis-password-file", str(self.redis_password_file)]
        return flags


def read_token(path: str | Path) -> str:
    """A plain token file's token (its first line)."""
    return Path(path).read_text().splitlines()[0].strip()


class LocalSecurity:
    """What ``--tls`` and ``--auth`` make for one local cluster, and the flags they give each
    process. Neither asked: no files, no flags."""

    def __init__(self, config: LocalClusterConfig) -> None:
        self._nodes = config.nodes
        self.pki = LocalPki(config.pki_dir) if config.tls else None
        self.secrets = LocalSecrets(config.secrets_dir) if config.auth else None

    def prepare(self) -> list[str]:
        """Create the files; returns what was made, for the progress lines."""
        made = []
        if self.pki is not None:
            self.pki.create()
            made.append(f"a local CA and certificates in {self.pki.root}")
        if self.secrets is not None:
            self.secrets.create(cluster_token=self.pki is None, shard_users=[f"shard-{k}" for k in range(self._nodes)])
            made.append(f"tokens{' and a cluster token' if self.pki is None else ''} in {self.secrets.root}")
        return made

    def serve_flags(self, role: str, name: str) -> list[str]:
        """The TLS and authentication flags of ``shard serve`` (``name``: its node id) or
        ``frontend serve``."""
        flags = self.pki.files(role).flags() if self.pki is not None else []
        user = name if role == "shard" else role
        return flags + (self.secrets.server_flags(role, user) if self.secrets is not None else [])

    def job_flags(self, command: str) -> list[str]:
        """What a one-shot command needs: ``placement init`` the admin's ZooKeeper
        credentials, ``features load`` the Redis password."""
        if self.secrets is None:
            return []
        if command == "placement":
            return ["--zk-auth", str(self.secrets.zk_auth_file(ADMIN_ROLE))]
        if command == "features":
            return ["--redis-password-file", str(self.secrets.redis_password_file)]
        return []

    @property
    def redis_password(self) -> str | None:
        return read_token(self.secrets.redis_password_file) if self.secrets is not None else None

    @property
    def admin_zk_auth(self) -> str:
        return str(self.secrets.zk_auth_file(ADMIN_ROLE)) if self.secrets is not None else ""

    def client(self) -> dict[str, str]:
        """The state file's fields a client needs: the CA to trust, the token files."""
        return {
            "tls_ca": str(self.pki.ca) if self.pki is not None else "",
            "token_file": str(self.secrets.caller_token_file) if self.secrets is not None else "",
            "admin_token_file": str(self.secrets.admin_token_file) if self.secrets is not None else "",
            "zk_auth": self.admin_zk_auth,
        }
