"""TLS material of one process (docs/security.md): its certificate and key, and the CA that
signs its peers', re-read when the files change (``watched.WatchedFiles``), and the gRPC and
``ssl`` credentials built from them.

- Servers (``server_credentials``): gRPC asks for the current certificate at every handshake
  (``grpc.dynamic_ssl_server_credentials``), so a rotated certificate is served by the next
  connection without a restart; ``require_client_auth`` makes it mTLS (the shard's port).
- Channels (``channel_credentials``): the process's certificate as its client certificate and
  the CA as the trust root; a pool of channels (``generation`` changed) opens new channels with
  rotated material and lets the old ones drain.
- The REST endpoint (``ssl_context``): an ``ssl.SSLContext`` reloaded in place by ``reload``.

grpc and ssl are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.core.config import TlsConfig
from services.core.watched import WatchedFiles

if TYPE_CHECKING:
    import ssl


@dataclass(frozen=True)
class TlsBytes:
    cert: bytes
    key: bytes
    ca: bytes


def _parse(contents: list[bytes]) -> TlsBytes:
    """The three files, checked: PEM blocks, a key that matches the certificate (a rotation
    caught between its two renames is refused, and the last good pair kept)."""
    cert, key, ca = contents
    for name, pem in (("certificate", cert), ("key", key), ("CA", ca)):
        if b"-----BEGIN " not in pem:
            raise ValueError(f"the {name} file holds no PEM block")
    b = TlsBytes(cert, key, ca)
    _load_pair(_ssl_context(server=True), b)  # ssl.SSLError (an OSError) when they do not match
    return b


def _ssl_context(*, server: bool) -> "ssl.SSLContext":
    import ssl

    return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH)


def _load_pair(ctx: "ssl.SSLContext", b: TlsBytes) -> None:
    """``load_cert_chain`` reads files: hand it these bytes, not the paths being rotated."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, b.cert), (key, b.key)):
            with open(path, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)


class TlsMaterial:
    """The process's certificate, key and CA, kept current. ConfigError at construction when a
    file is missing or holds no PEM block."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._files = WatchedFiles([config.cert_file, config.key_file, config.ca_file], _parse, poll_s=config.poll_s)

    @property
    def generation(self) -> int:
        self._files.get()
        return self._files.generation

    def current(self) -> TlsBytes:
        return self._files.get()

    def server_credentials(self, *, require_client_auth: bool):  # noqa: ANN201 - grpc.ServerCredentials
        import grpc

        def configuration(b: TlsBytes):  # noqa: ANN202
            return grpc.ssl_server_certificate_configuration([(b.key, b.cert)], root_certificates=b.ca)

        served = [self._files.generation]

        def fetch():  # noqa: ANN202 - called by gRPC at every handshake; None keeps the current one
            b = self._files.get()
            if self._files.generation == served[0]:
                return None
            served[0] = self._files.generation
            return configuration(b)

        return grpc.dynamic_ssl_server_credentials(
            configuration(self.current()), fetch, require_client_authentication=require_client_auth
        )

    def channel_credentials(self):  # noqa: ANN201 - grpc.ChannelCredentials
        import grpc

        b = self.current()
        return grpc.ssl_channel_credentials(root_certificates=b.ca, private_key=b.key, certificate_chain=b.cert)

    def ssl_context(self, *, server: bool) -> "ssl.SSLContext":
        ctx = _ssl_context(server=server)
        self.load(ctx)
        return ctx

    def load(self, ctx: "ssl.SSLContext") -> None:
        """(Re)load the current certificate, key and CA into ``ctx`` (new handshakes use them)."""
        b = self.current()
        ctx.load_verify_locations(cadata=b.ca.decode())
        _load_pair(ctx, b)


def client_credentials(ca_file: str, cert_file: str = "", key_file: str = ""):  # noqa: ANN201
    """Channel credentials of a client outside the cluster (the load harness, the demo, tests):
    trust ``ca_file``; present ``cert_file`` / ``key_file`` when given."""
    import grpc

    def read(p: str) -> bytes | None:
        if not p:
            return None
        with open(p, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file))
