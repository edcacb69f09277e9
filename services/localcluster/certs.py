"""A local certificate authority and the certificates of a local cluster (``cluster up --tls``,
the tests): one CA, and per role (frontend, shard, admin, client) a key and a certificate whose
common name is ``shardrec-<role>``, valid for localhost, 127.0.0.1 and ::1, for both server and
client use (docs/security.md). Files are replaced atomically, so ``renew`` is a rotation the
running processes pick up (``services.core.watched``).

Uses the ``cryptography`` package, imported inside the functions.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

ROLES = ("frontend", "shard", "admin", "client")
VALID_DAYS = 30


def common_name(role: str) -> str:
    return f"shardrec-{role}"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        """The ``--tls-*`` flags of a ``serve`` command."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class LocalPki:
    """The CA and role certificates under ``root`` (``ca.pem``, ``ca-key.pem``,
    ``<role>.pem``, ``<role>-key.pem``). ``create()`` makes them all; ``files(role)`` names
    them; ``renew(role)`` issues a new key and certificate for a role (same CA)."""

    def __init__(self, root: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> None:
        self.root = Path(root)
        self.hosts = hosts

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def files(self, role: str) -> CertFiles:
        return CertFiles(self.root / f"{role}.pem", self.root / f"{role}-key.pem", self.ca)

    def create(self) -> "LocalPki":
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.root.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shardrec local CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        _write(self.root / "ca-key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))  # fmt: skip
        _write(self.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        for role in ROLES:
            self.renew(role)
        return self

    def renew(self, role: str) -> CertFiles:
        """A new key and certificate for ``role``, signed by the CA; the key file is replaced
        first, then the certificate (a reader that sees a mismatched pair fails to parse it and
        keeps the last good one until both are in place)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = serialization.load_pem_private_key((self.root / "ca-key.pem").read_bytes(), None)
        ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in self.hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name(role))]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        files = self.files(role)
        _write(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return files
