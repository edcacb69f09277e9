"""CheckpointStore: byte-level access to one checkpoint root (see docs/checkpoint.md).

A root is a URI: a plain path (``/data/ckpt``, ``ckpt``) or ``file:///data/ckpt``. Every other
scheme is refused with a CheckpointError today. This module is the one place a root URI is parsed
(``absolute_uri`` is what every URI published to other processes goes through),
so an object store (an fsspec filesystem that downloads a file to a local cache on
``local_path``) can be added later as a second backend behind the same methods without touching
the reader or the writer.

Relative paths (``relpath``) are POSIX paths below the root, e.g.
``versions/3/tables/items.npy``; absolute paths and ``..`` are refused, so a manifest can never
name a file outside its checkpoint.

The store holds no open files and no mutable state: any thread may call it.

Pure module: no torch, no grpc.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import urllib.parse
from collections.abc import Callable
from typing import BinaryIO

from services.core.errors import CheckpointError
from services.core.types import Version

# Files are hashed in chunks of this size, so a multi-GiB table never sits in memory.
HASH_CHUNK_BYTES = 1 << 20

# Folder names that are versions: a positive decimal int written canonically (no sign, no
# leading zero). ``versions/3.tmp-1a2b`` (a writer's staging folder) and other junk are ignored.
_VERSION_NAME = re.compile(r"[1-9][0-9]*")

# Schemes a store can open today. An fsspec-backed store would add e.g. "s3", "gs" here.
_LOCAL_SCHEMES = ("", "file")


def _scheme(text: str) -> str:
    """The URI scheme of ``text``, lowercase; "" for a plain path. A one-letter "scheme" is a
    Windows drive letter (C:\\ckpt), i.e. a plain path."""
    scheme = urllib.parse.urlsplit(text).scheme
    return scheme.lower() if len(scheme) > 1 else ""


def _local_root(uri: str) -> pathlib.Path:
    """The local folder a root URI names; CheckpointError for any non-local scheme."""
    text = os.fspath(uri)
    parsed = urllib.parse.urlsplit(text)
    scheme = _scheme(text)
    if scheme not in _LOCAL_SCHEMES:
        raise CheckpointError(
            f"checkpoint root {text!r}: unsupported URI scheme {parsed.scheme!r}; "
            f"supported: a plain path or file:// (object stores are not supported yet)"
        )
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(
                f"checkpoint root {text!r}: file:// URI with host {parsed.netloc!r}; "
                f"use file:///absolute/path"
            )
        path = urllib.parse.unquote(parsed.path)
        if not path:
            raise CheckpointError(f"checkpoint root {text!r}: file:// URI without a path")
        return pathlib.Path(path)
    return pathlib.Path(text)


def absolute_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` in a form that names the same root from any working directory: an absolute one
    as given, a relative plain path made absolute against this process's working directory
    (``ckpt`` -> ``/home/me/ckpt``), a relative ``file:`` URI likewise (``file:ckpt`` ->
    ``file:///home/me/ckpt``). Every URI written where another process reads it (ZooKeeper's
    model pointer, a local cluster's commands) goes through here. CheckpointError for a scheme
    a store cannot open."""
    text = os.fspath(uri)
    if not text.strip():
        raise CheckpointError("checkpoint root is empty: give a path or a file:// URI")
    root = _local_root(text)
    if root.is_absolute():
        return text
    absolute = pathlib.Path(os.path.abspath(root))
    return absolute.as_uri() if _scheme(text) == "file" else str(absolute)


def is_version_name(name: str) -> bool:
    """True when ``name`` is a version folder's name: a positive decimal int written
    canonically (``3``, not ``03``, ``+3``, ``3.tmp-1a2b``)."""
    return _VERSION_NAME.fullmatch(name) is not None


def _check_relpath(relpath: str) -> pathlib.PurePosixPath:
    p = pathlib.PurePosixPath(relpath)
    if not relpath or p.is_absolute() or ".." in p.parts or "\\" in relpath:
        raise CheckpointError(f"checkpoint path {relpath!r} must be relative to the root, without '..'")
    return p


class CheckpointStore:
    """Read access to the files below one checkpoint root, plus ``local_path`` for writers and
    memory maps.

    Contract: ``read_bytes``, ``exists`` and ``size_bytes`` never create anything;
    ``list_versions`` returns the version folders that exist (complete or not: completeness is
    the reader's business), sorted ascending.
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        self._uri = os.fspath(uri)
        self._root = _local_root(self._uri)

    @property
    def uri(self) -> str:
        """The root URI exactly as given."""
        return self._uri

    def __repr__(self) -> str:
        return f"CheckpointStore({self._uri!r})"

    def local_path(self, relpath: str) -> pathlib.Path:
        """A local filesystem path for ``relpath`` (which may not exist yet), e.g. to memory-map
        it. An object-store backend would download the file to a local cache first."""
        return self._root.joinpath(*_check_relpath(relpath).parts)

    def exists(self, relpath: str) -> bool:
        """True when ``relpath`` is an existing file or folder."""
        return self.local_path(relpath).exists()

    def size_bytes(self, relpath: str) -> int:
        """Size of the file ``relpath``; CheckpointError naming it when it is missing."""
        try:
            return self.local_path(relpath).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self._uri}: missing file {relpath}") from None
        except OSError as e:
            raise CheckpointError(f"{self._uri}: cannot stat {relpath}: {e}") from e

    def open_read(self, relpath: str) -> BinaryIO:
        """Open ``relpath`` for streaming reads (binary); the caller closes it."""
        try:
            return open(self.local_path(relpath), "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise CheckpointError(f"{self._uri}: missing file {relpath}") from None
        except OSError as e:
            raise CheckpointError(f"{self._uri}: cannot open {relpath}: {e}") from e

    def read_bytes(self, relpath: str) -> bytes:
        """The whole content of a (small) file; CheckpointError naming it when it is missing."""
        with self.open_read(relpath) as f:
            return f.read()

    def sha256(self, relpath: str, pace: Callable[[], None] | None = None) -> str:
        """sha256 hex of the file ``relpath``, read in 1 MiB chunks (``pace`` called after each)."""
        h = hashlib.sha256()
        with self.open_read(relpath) as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                h.update(chunk)
                if pace is not None:
                    pace()
        return h.hexdigest()

    def list_versions(self) -> list[Version]:
        """Every ``versions/<N>`` folder with N a positive int, sorted ascending; other names
        (staging folders, stray files) are ignored. An absent root or ``versions/`` gives []."""
        folder = self.local_path("versions")
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CheckpointError(f"{self._uri}: cannot list versions/: {e}") from e
        return sorted(int(e.name) for e in entries if is_version_name(e.name) and e.is_dir())


# What the checkpoint APIs take as a root: a store, or a URI / path to open one on.
StoreOrUri = CheckpointStore | str | os.PathLike[str]


def as_store(store_or_uri: StoreOrUri) -> CheckpointStore:
    """``store_or_uri`` itself when it is a CheckpointStore, else a store on that URI."""
    return store_or_uri if isinstance(store_or_uri, CheckpointStore) else CheckpointStore(store_or_uri)
