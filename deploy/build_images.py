"""Build shardrec's images without a public registry or package index (docs/deploy.md).

    python deploy/build_images.py [--tag dev] [--revision REV] [--only shardrec]

- ``shardrec:TAG`` from deploy/Dockerfile, ``shardrec-zookeeper:3.8`` and ``shardrec-redis:7``
  from deploy/images/ (Debian's packages).
- Bases: ``python:3.11-slim-bookworm`` and ``debian:bookworm-slim`` where they are present or can
  be pulled; otherwise a bookworm made here (``debootstrap --variant=minbase`` from the mirror
  apt uses, ``docker import``), and a Python base on it (deploy/images/python.Dockerfile).
- Python packages: a wheelhouse built on this host (``pip wheel``: the host's pip finds the
  local CPU torch wheel), served on 127.0.0.1 to the build (``--network host``) so pip in the
  build installs only those wheels (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``).

Slow steps are cached under var/docker/ (the debootstrap tarball, the wheelhouse); a second
run rebuilds only what changed. Builds run one at a time, with the classic builder (the
engine here has no buildx), and a summary of sizes and times lands in var/docker/images.json.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docker_engine import EngineError, apt_install, ensure_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "var" / "docker"
IMAGES_DIR = REPO / "deploy" / "images"

OFFICIAL_PYTHON = "python:3.11-slim-bookworm"
OFFICIAL_DEBIAN = "debian:bookworm-slim"
LOCAL_DEBIAN = "shardrec-base/debian:bookworm"
LOCAL_PYTHON = "shardrec-base/python:3.11-bookworm"
ZOOKEEPER_IMAGE = "shardrec-zookeeper:3.8"
REDIS_IMAGE = "shardrec-redis:7"
TORCH = "torch==2.13.0"  # the pin of deploy/Dockerfile
WHEEL_PORT = 18650  # fixed: the wheelhouse URL is a build arg, part of the layer cache key


def log(msg: str) -> None:
    print(f"[images] {msg}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kw)


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def image_size_bytes(name: str) -> int:
    out = run(["docker", "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True)
    return int(out.stdout.strip())


def pullable(name: str) -> bool:
    """Present, or pulled now (a registry that cannot be reached fails within a second)."""
    if image_exists(name):
        return True
    log(f"pulling {name}")
    return subprocess.run(["docker", "pull", "-q", name], capture_output=True).returncode == 0


# -- the local bookworm base -------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 ``URIs:`` or one-line ``deb`` entries)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def debootstrap_tarball() -> Path:
    """var/docker/base/bookworm-minbase.tar: a minbase bookworm root, made once (~35 s)."""
    tarball = STATE / "base" / "bookworm-minbase.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        apt_install(["debootstrap"])
    mirror = debian_mirror()
    root = STATE / "base" / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap --variant=minbase bookworm from {mirror}")
    with open(STATE / "base" / "debootstrap.log", "wb") as out:
        run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror], stdout=out, stderr=out)
    # Like debian:bookworm-slim: updates and security sources, no docs, man pages or locales,
    # no apt caches; the images clean up after apt-get themselves.
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\ndeb {security} bookworm-security main\n"
    )
    (root / "etc/dpkg/dpkg.cfg.d/slim").write_text(
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/locale/*\npath-exclude /usr/share/info/*\n"
    )
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Binary::apt::APT::Keep-Downloaded-Packages "false";\n'
    )
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        for child in (root / sub).glob("*"):
            if child.is_dir() and child.name != "partial":
                shutil.rmtree(child)
            elif child.is_file() and not child.name.endswith("copyright"):
                child.unlink()
    partial = tarball.with_suffix(".tar.partial")
    run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."])
    partial.rename(tarball)
    shutil.rmtree(root)
    return tarball


def local_bases() -> tuple[str, str]:
    """(python base, debian base) made here: the imported debootstrap root and a Python on it."""
    if not image_exists(LOCAL_DEBIAN):
        tarball = debootstrap_tarball()
        log(f"docker import {tarball.name} as {LOCAL_DEBIAN}")
        with open(tarball, "rb") as data:
            run(["docker", "import", "--change", 'CMD ["bash"]', "-", LOCAL_DEBIAN], stdin=data, stdout=subprocess.DEVNULL)
    build(LOCAL_PYTHON, IMAGES_DIR / "python.Dockerfile", IMAGES_DIR, {"BASE_IMAGE": LOCAL_DEBIAN})
    return LOCAL_PYTHON, LOCAL_DEBIAN


def choose_bases(base: str) -> tuple[str, str]:
    if base == "official" or (base == "auto" and pullable(OFFICIAL_PYTHON) and pullable(OFFICIAL_DEBIAN)):
        return OFFICIAL_PYTHON, OFFICIAL_DEBIAN
    if base == "auto":
        log(f"{OFFICIAL_PYTHON} / {OFFICIAL_DEBIAN} cannot be pulled: building a local bookworm base")
    return local_bases()


# -- the wheelhouse ------------------------------------------------------------------------------


def wheelhouse(pip: str) -> Path:
    """var/docker/wheels: every wheel the image installs, built or downloaded on this host by
    ``pip`` (the project's venv pip, which finds the local CPU torch wheel). Rebuilt when
    pyproject.toml changes."""
    wheels = STATE / "wheels"
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    stamp = wheels / ".stamp"
    if stamp.exists() and stamp.read_text() == key:
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    log(f"building the wheelhouse in {wheels.relative_to(REPO)} (pip wheel)")
    run([pip, "wheel", "-q", "--wheel-dir", str(wheels), str(REPO), TORCH, "setuptools>=68", "wheel"])
    extra = python_conditional_requirements(wheels)
    if extra:  # needed by an older or newer Python than this host's (bookworm's is 3.11.2)
        run([pip, "wheel", "-q", "--wheel-dir", str(wheels), *extra])
    for own in wheels.glob("shardrec-*.whl"):
        own.unlink()  # the image installs the project from its source
    cuda = [w.name for w in wheels.glob("nvidia_*")] + [w.name for w in wheels.glob("torch-*") if "+cpu" not in w.name]
    if cuda:
        raise SystemExit(f"the wheelhouse holds CUDA wheels {cuda}: point pip at a CPU torch wheel")
    stamp.write_text(key)
    return wheels


def python_conditional_requirements(wheels: Path) -> list[str]:
    """Requirements of the wheelhouse's wheels that hold only on some Python versions, e.g.
    redis's ``async-timeout; python_full_version < "3.11.3"``, without their markers: the
    host's resolver skipped them, the image's Python may need them."""
    import zipfile

    found = set()
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            if meta is None:
                continue
            for line in z.read(meta).decode(errors="replace").splitlines():
                if not line.startswith("Requires-Dist:") or ";" not in line:
                    continue
                req, marker = (part.strip() for part in line[len("Requires-Dist:"):].split(";", 1))
                if "python_" in marker and "extra" not in marker:
                    found.add(req.replace(" ", ""))
    return sorted(found)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class WheelServer:
    """The wheelhouse over HTTP on 127.0.0.1 (pip treats loopback as a secure origin)."""

    def __init__(self, wheels: Path, port: int) -> None:
        handler = functools.partial(_QuietHandler, directory=str(wheels))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="wheels", daemon=True)

    def __enter__(self) -> "WheelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- builds ----------------------------------------------------------------------------------------


def build(tag: str, dockerfile: Path, context: Path, args: dict[str, str]) -> float:
    """``docker build`` (classic builder, host network) with its output in
    var/docker/build-<name>.log; returns the seconds it took."""
    STATE.mkdir(parents=True, exist_ok=True)
    log_path = STATE / f"build-{re.sub(r'[^A-Za-z0-9]+', '-', tag)}.log"
    argv = ["docker", "build", "--force-rm", "--network", "host", "-f", str(dockerfile), "-t", tag]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    argv.append(str(context))
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    took = time.monotonic() - t0
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"docker build of {tag} failed ({log_path}):\n" + "\n".join(tail))
    log(f"{tag}: built in {took:.1f}s")
    return took


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="dev", help="tag of the shardrec image (default dev)")
    parser.add_argument("--revision", default=None, help="the image's revision label (default: git describe)")
    parser.add_argument("--only", choices=["shardrec", "zookeeper", "redis"], action="append",
                        help="build only these images (repeatable; default all)")
    parser.add_argument("--base", choices=["auto", "official", "local"], default="auto",
                        help="auto: the official bases where they can be pulled, else local ones")
    parser.add_argument("--pip", default=str(REPO / ".venv" / "bin" / "pip"), help="pip that builds the wheelhouse")
    parser.add_argument("--wheel-port", type=int, default=WHEEL_PORT, help="127.0.0.1 port of the wheelhouse")
    args = parser.parse_args(argv)
    only = set(args.only or ["shardrec", "zookeeper", "redis"])

    t_start = time.monotonic()
    try:
        ensure_engine()
    except EngineError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    python_base, debian_base = choose_bases(args.base)
    times: dict[str, float] = {}
    if "shardrec" in only:
        wheels = wheelhouse(args.pip)
        tag = f"shardrec:{args.tag}"
        with WheelServer(wheels, args.wheel_port) as server:
            build_args = {
                "BASE_IMAGE": python_base,
                "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": server.url,
                "REVISION": args.revision or git_revision(),
            }
            times[tag] = build(tag, REPO / "deploy" / "Dockerfile", REPO, build_args)
    if "zookeeper" in only:
        times[ZOOKEEPER_IMAGE] = build(ZOOKEEPER_IMAGE, IMAGES_DIR / "zookeeper.Dockerfile", IMAGES_DIR, {"BASE_IMAGE": debian_base})
    if "redis" in only:
        times[REDIS_IMAGE] = build(REDIS_IMAGE, IMAGES_DIR / "redis.Dockerfile", IMAGES_DIR, {"BASE_IMAGE": debian_base})

    summary = {
        "bases": {"python": python_base, "debian": debian_base},
        "images": {tag: {"build_s": round(s, 1), "size_bytes": image_size_bytes(tag)} for tag, s in times.items()},
        "total_s": round(time.monotonic() - t_start, 1),
    }
    (STATE / "images.json").write_text(json.dumps(summary, indent=2) + "\n")
    for tag, info in summary["images"].items():
        log(f"{tag}: {info['size_bytes'] / 2**20:.0f} MiB, built in {info['build_s']}s")
    log(f"done in {summary['total_s']}s (var/docker/images.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
