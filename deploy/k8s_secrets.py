"""Make the Secrets deploy/k8s needs, for a test or demo cluster, and a kustomize overlay that
deploys the manifests with them (docs/deploy.md, "Secrets"):

    python deploy/k8s_secrets.py --out var/k8s [--namespace recsys] [--tls]
    kubectl apply -n recsys -k var/k8s

``OUT/secrets/`` gets fresh tokens (the hashed tokens file the frontends read, and the plain
caller and admin tokens for your clients, which stay here), the cluster token, the ZooKeeper
credentials of each role (one shared user for the shards: a StatefulSet cannot give each pod
its own Secret) and the Redis password (configure your Redis with it: ``requirepass``); with
``--tls`` ``OUT/pki/`` a CA and the shard and frontend certificates (deploy/k8s/tls/).
``OUT/kustomization.yaml`` names deploy/k8s (and its tls component) and generates every Secret
from those files, under the fixed names the manifests mount. For production, make the same
Secrets from your own PKI and secret store instead. Files are mode 0600; keep OUT private.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.localcluster.certs import LocalPki  # noqa: E402
from services.localcluster.security import LocalSecrets  # noqa: E402

SHARD_USER = "shard"


def tls_hosts(namespace: str, domain: str) -> tuple[str, ...]:
    """Names the certificates hold: what frontends dial a shard by (its pod's DNS name under
    the headless Service, ADVERTISE_DOMAIN of deploy/k8s/tls), what callers dial the frontends
    by (the Service), and localhost."""
    svc = f"shardrec-frontend.{namespace}.svc"
    return (f"*.shardrec-shard.{namespace}.svc.{domain}", "shardrec-frontend", f"shardrec-frontend.{namespace}", svc,
            f"{svc}.{domain}", "localhost", "127.0.0.1", "::1")  # fmt: skip


def secret_files(secrets: LocalSecrets, pki: LocalPki | None) -> dict[str, tuple[str, dict[str, Path]]]:
    """Secret name -> (type, key -> file): every Secret the manifests (and tls/) mount."""
    out: dict[str, tuple[str, dict[str, Path]]] = {
        "shardrec-tokens": ("Opaque", {"tokens.toml": secrets.tokens_file}),
        "shardrec-cluster-token": ("Opaque", {"cluster-token": secrets.cluster_token_file}),
        "shardrec-zookeeper-auth": ("Opaque", {f"{role}.toml": secrets.zk_auth_file(user)
                                               for role, user in (("admin", "admin"), ("frontend", "frontend"), ("shard", SHARD_USER))}),
        "shardrec-redis-auth": ("Opaque", {"password": secrets.redis_password_file}),
    }  # fmt: skip
    if pki is not None:
        for role in ("shard", "frontend"):
            f = pki.files(role)
            out[f"shardrec-tls-{role}"] = ("kubernetes.io/tls", {"tls.crt": f.cert, "tls.key": f.key, "ca.crt": f.ca})
    return out


def kustomization(out: Path, files: dict[str, tuple[str, dict[str, Path]]], tls: bool) -> str:
    base = os.path.relpath(REPO / "deploy" / "k8s", out)
    lines = [
        "# Made by deploy/k8s_secrets.py: deploy/k8s with its Secrets. kubectl apply -n <namespace> -k <this folder>",
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"resources: [{base}]",
    ]
    if tls:
        lines.append(f"components: [{base}/tls]")
    lines.append("secretGenerator:")
    for name, (kind, keys) in files.items():
        lines += [f"  - name: {name}", f"    type: {kind}", "    files:"]
        lines += [f"      - {key}={path.relative_to(out)}" for key, path in keys.items()]
    lines += ["generatorOptions:", "  disableNameSuffixHash: true   # the names the manifests mount; a change updates the files in place"]
    return "\n".join(lines) + "\n"


def make(out: Path, *, namespace: str, tls: bool, domain: str = "cluster.local") -> dict[str, tuple[str, dict[str, Path]]]:
    """Write the secrets, certificates and kustomization under ``out``; returns what each
    Secret holds."""
    out.mkdir(parents=True, exist_ok=True)
    secrets = LocalSecrets(out / "secrets").create(cluster_token=True, shard_users=[SHARD_USER])
    pki = LocalPki(out / "pki", hosts=tls_hosts(namespace, domain)).create() if tls else None
    files = secret_files(secrets, pki)
    (out / "kustomization.yaml").write_text(kustomization(out, files, tls))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the secrets and the kustomization")
    parser.add_argument("--namespace", default="default", help="the namespace you deploy into (names in the certificates)")
    parser.add_argument("--tls", action="store_true", help="also a CA and certificates, and the tls component")
    parser.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    files = make(out, namespace=args.namespace, tls=args.tls, domain=args.cluster_domain)
    print(f"wrote {len(files)} Secrets' files under {out} and {out / 'kustomization.yaml'}:")
    for name, (_kind, keys) in files.items():
        print(f"  {name}: {', '.join(keys)}")
    secrets = LocalSecrets(out / "secrets")
    print(f"Redis: give the Redis shardrec uses the password in {secrets.redis_password_file} (requirepass)")
    print(f"callers send the token in {secrets.caller_token_file} (admin: {secrets.admin_token_file})")
    print(f"deploy: kubectl apply -n {args.namespace} -k {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
