"""Host and port as one address string, IPv6 included (pure): ``[::1]:50051``, ``10.0.0.7:50051``.

Every address a server binds, prints, advertises in ZooKeeper or dials is written by
``join_host_port`` and read by ``split_host_port``, so an IPv6 host is always bracketed.
"""

from __future__ import annotations


def join_host_port(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 host in brackets (``::`` -> ``[::]:port``); a host already
    bracketed is kept as it is."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``[v6]:port`` (the host without brackets).
    ValueError when there is no port."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"address {address!r}: expected [host]:port")
        return host, int(rest[1:])
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:
        raise ValueError(f"address {address!r}: expected host:port (an IPv6 host in brackets)")
    return host, int(port)
