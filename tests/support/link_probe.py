"""The bandwidth cap of ``benchmarks/network/emulated.py`` measured in a namespace of its own:
``python -m tests.support.link_probe MBIT BYTES`` prints one JSON object (``{"skip": why}``
where a network namespace or tc is not permitted). Run as a child process: it moves itself
into a new network namespace, so the caller's network is never shaped.

It sends BYTES to a sink on loopback with the sink's port capped at MBIT (``LinkShaper``),
then again after ``LinkShaper.clear``; both times, the seconds until the sink has them all.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

from benchmarks.network.emulated import SERVER_HOST, LinkShaper, enter_private_network
from services.core.errors import FailedPreconditionError


def _qdisc() -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True).stdout


def _transfer(port: int, listener: socket.socket, size: int) -> float:
    """Seconds from connecting until the sink has received ``size`` bytes."""
    got = [0]

    def sink() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 20):
                got[0] += len(data)

    t = threading.Thread(target=sink)
    t.start()
    t0 = time.monotonic()
    with socket.create_connection((SERVER_HOST, port)) as c:
        c.sendall(b"\0" * size)
        c.shutdown(socket.SHUT_WR)
        t.join()
    if got[0] != size:
        raise RuntimeError(f"the sink received {got[0]} of {size} bytes")
    return time.monotonic() - t0


def main() -> int:
    mbit, size = float(sys.argv[1]), int(sys.argv[2])
    try:
        enter_private_network()
    except FailedPreconditionError as e:
        print(json.dumps({"skip": str(e)}))
        return 0
    listener = socket.create_server((SERVER_HOST, 0))
    port = listener.getsockname()[1]
    shaper = LinkShaper(mbit)
    try:
        shaper.apply({"sink": port})
    except FailedPreconditionError as e:
        print(json.dumps({"skip": f"tc htb on loopback: {e}"}))
        return 0
    during = _qdisc()
    capped_s = _transfer(port, listener, size)
    link_bytes = shaper.bytes()
    shaper.clear()
    after = _qdisc()
    free_s = _transfer(port, listener, size)
    print(json.dumps({"capped_s": capped_s, "free_s": free_s, "link_bytes": link_bytes, "qdisc_during": during,
                      "qdisc_after": after, "classes_after": shaper.classes}))  # fmt: skip
    return 0


if __name__ == "__main__":
    if shutil.which("tc") is None:
        print(json.dumps({"skip": "no tc (iproute2) on PATH"}))
        sys.exit(0)
    sys.exit(main())
