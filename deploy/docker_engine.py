"""Make sure a Docker engine answers on this machine; start (and install) one if needed.

    python deploy/docker_engine.py            # exit 0 when an engine answers, else 1 and why

On the CI machines there is no systemd: the engine is Debian's ``docker.io`` (with
``docker-compose``, compose v1) started as root in the background, its log in
``var/docker/dockerd.log`` (docs/deploy.md). Elsewhere an engine that already answers is used
as it is; nothing is installed or started unless it is missing and we are root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "var" / "docker"
SOCKET = Path("/var/run/docker.sock")
START_TIMEOUT_S = 60.0


class EngineError(Exception):
    """No Docker engine answers and none could be started; the message says why."""


def answers(timeout_s: float = 10.0) -> tuple[bool, str]:
    """(True, server version) when ``docker info`` reaches an engine, else (False, why)."""
    if shutil.which("docker") is None:
        return False, "no docker command"
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return False, f"docker info did not answer within {timeout_s:.0f}s"
    if out.returncode != 0 or not out.stdout.strip():
        return False, (out.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return True, out.stdout.strip()


def apt_install(packages: list[str]) -> None:
    """Debian packages (apt-get; root only)."""
    if shutil.which("apt-get") is None:
        raise EngineError(f"{' and '.join(packages)} missing and no apt-get to install them")
    print(f"installing {' '.join(packages)} (Debian packages)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")


def _start_dockerd() -> None:
    """``dockerd`` in its own session, in the background (no systemd here), logging to
    var/docker/dockerd.log; returns once ``docker info`` answers."""
    STATE.mkdir(parents=True, exist_ok=True)
    log_path = STATE / "dockerd.log"
    print(f"starting dockerd (log: {log_path})", flush=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    why = "not started"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise EngineError(f"dockerd exited with {proc.returncode}: " + " | ".join(tail))
        if SOCKET.exists():
            ok, why = answers(5.0)
            if ok:
                return
        time.sleep(0.5)  # step of the wait for the engine's socket
    raise EngineError(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s ({why}); see {log_path}")


def ensure_engine(install: bool = True) -> str:
    """Return the engine's version, starting it (and installing it, with ``install``) first
    when nothing answers. Raises EngineError saying why when that is not possible."""
    ok, detail = answers()
    if ok:
        return detail
    if os.geteuid() != 0:
        raise EngineError(f"no Docker engine answers ({detail}) and starting one needs root: start dockerd, then re-run")
    if shutil.which("dockerd") is None:
        if not install:
            raise EngineError(f"no Docker engine answers ({detail}) and dockerd is not installed")
        apt_install(["docker.io", "docker-compose"])
    if shutil.which("docker") is None:
        raise EngineError("dockerd is installed but the docker command is missing")
    _start_dockerd()
    ok, detail = answers()
    if not ok:
        raise EngineError(detail)
    return detail


def compose_command() -> list[str]:
    """How to run compose here: ``docker-compose`` (v1, Debian's) or ``docker compose`` (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if os.geteuid() == 0 and shutil.which("apt-get"):
        apt_install(["docker-compose"])
        return ["docker-compose"]
    raise EngineError("neither docker-compose nor `docker compose` is installed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-install", action="store_true", help="never apt-get install the engine")
    args = parser.parse_args(argv)
    try:
        version = ensure_engine(install=not args.no_install)
        compose = compose_command()
    except EngineError as e:
        print(f"docker: {e}", file=sys.stderr)
        return 1
    print(f"docker engine {version} answers; compose: {' '.join(compose)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
