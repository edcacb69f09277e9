"""Every znode's JSON as a typed record, written and parsed here and nowhere else.

One record per kind of znode; docs/zookeeper.md shows each one's JSON and what its fields mean:
``NodeRecord`` (``nodes/<node_id>``, with ``HeldPartition``, ``LoadError``, ``PartitionError``),
``FrontendRecord`` (``frontends/<frontend_id>``), ``ModelPointer`` (``model/checkpoint``),
``VersionRecord`` (``model/serving_version``, ``model/target_version``). The shard map has its
own codec (``ShardMap.to_bytes``).

Compatibility (a rolling upgrade runs old and new processes side by side): ``to_bytes`` writes
compact JSON with sorted keys under the field names docs/zookeeper.md lists; ``from_bytes``
ignores fields it does not know (a newer writer) and gives a missing or null field its default
(an older writer). Data that is not JSON, not an object, or has a field of the wrong type raises
``RecordError`` (a ConfigError); readers of members skip such a znode with a warning.

Pure module: records are frozen; no kazoo, grpc or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from services.core.errors import ConfigError


class RecordError(ConfigError):
    """A znode does not hold the record its path promises: not JSON, not a JSON object, or a
    field of the wrong type. The message names the znode and the field."""


class ZnodeRecord(Protocol):
    """What a registration writes: a record that encodes itself."""

    def to_bytes(self) -> bytes: ...


class MemberRecord(Protocol):
    """A live process's znode (``NodeRecord``, ``FrontendRecord``): where to dial it, and which
    process wrote it (``instance_id``, a random token per process; "" from older writers)."""

    @property
    def address(self) -> str: ...

    @property
    def instance_id(self) -> str: ...


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _with_instance(instance_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A member's fields plus ``instance_id`` when it has one. The field came after the others:
    left out when unset, a record of an older writer encodes to the bytes it read."""
    if instance_id:
        fields["instance_id"] = instance_id
    return fields


class _Fields:
    """Typed access to one decoded JSON object; a field of the wrong type raises RecordError.
    A missing or null field reads as the default."""

    def __init__(self, obj: Mapping[str, Any], where: str) -> None:
        self._obj = obj
        self.where = where

    @classmethod
    def decode(cls, data: bytes, where: str) -> "_Fields":
        try:
            value = json.loads(data)
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise RecordError(f"{where} does not hold valid JSON: {e}") from e
        return cls.of(value, where)

    @classmethod
    def of(cls, value: Any, where: str) -> "_Fields":
        if not isinstance(value, dict):
            raise RecordError(f"{where} must hold a JSON object, got {str(value)[:80]!r}")
        return cls(value, where)

    def _typed(self, key: str, types: tuple[type, ...], what: str) -> Any:
        value = self._obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise RecordError(f"{self.where}: field {key!r} must be {what}, got {str(value)[:80]!r}")
        return value

    def str(self, key: str, default: str = "") -> str:
        value = self._typed(key, (str,), "a string")
        return default if value is None else value

    def int(self, key: str) -> int | None:
        return self._typed(key, (int,), "an integer")

    def count(self, key: str) -> int:
        value = self.int(key)
        return 0 if value is None else value

    def number(self, key: str) -> float:
        value = self._typed(key, (int, float), "a number")
        return 0.0 if value is None else float(value)

    def _list(self, key: str, types: tuple[type, ...], what: str) -> tuple[Any, ...]:
        items = self._typed(key, (list,), f"a list of {what}s") or ()
        for item in items:
            if isinstance(item, bool) or not isinstance(item, types):
                raise RecordError(f"{self.where}: field {key!r} must be a list of {what}s, got {str(item)[:80]!r} in it")
        return tuple(items)

    def strs(self, key: str) -> tuple[str, ...]:
        return self._list(key, (str,), "string")

    def ints(self, key: str) -> tuple[int, ...]:
        return self._list(key, (int,), "integer")

    def obj(self, key: str) -> "_Fields | None":
        value = self._typed(key, (dict,), "an object")
        return None if value is None else _Fields(value, f"{self.where}: {key}")

    def items(self) -> list[tuple[str, "_Fields"]]:
        return [(k, _Fields.of(v, f"{self.where}[{k!r}]")) for k, v in self._obj.items()]


# -- nodes/<node_id> ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldPartition:
    """One partition a node holds (``held["items/1of2"]``): its bytes over every version held,
    the lookups (bag groups) and ids served since it was loaded, ids per second lately."""

    size_bytes: int = 0
    lookups: int = 0
    ids: int = 0
    ids_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.size_bytes, "lookups": self.lookups, "ids": self.ids, "ids_per_s": self.ids_per_s}

    @classmethod
    def _read(cls, f: _Fields) -> "HeldPartition":
        return cls(f.count("bytes"), f.count("lookups"), f.count("ids"), f.number("ids_per_s"))


@dataclass(frozen=True)
class LoadError:
    """The last target version a node refused, and why (``load_error``)."""

    version: int
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "error": self.error}

    @classmethod
    def _read(cls, f: _Fields | None) -> "LoadError | None":
        if f is None:
            return None
        version = f.int("version")
        if version is None:
            raise RecordError(f"{f.where}: field 'version' is missing")
        return cls(version, f.str("error"))


@dataclass(frozen=True)
class PartitionError:
    """The last partition a node failed to load, and why (``partition_error``)."""

    partition: str
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "error": self.error}

    @classmethod
    def _read(cls, f: _Fields | None) -> "PartitionError | None":
        return None if f is None else cls(f.str("partition"), f.str("error"))


@dataclass(frozen=True)
class NodeRecord:
    """A live shard's znode: where to dial it, what it holds and serves, how a load went.

    Fields as docs/zookeeper.md ("The JSON of every znode") tells them. ``partitions``,
    ``versions_ready``, ``partitions_loading`` and ``partitions_draining`` keep the writer's
    order. Do not mutate ``held``.
    """

    node_id: str = ""
    address: str = ""
    partitions: tuple[str, ...] = ()
    held: Mapping[str, HeldPartition] = field(default_factory=dict)
    memory_bytes: int = 0
    versions_ready: tuple[int, ...] = ()
    serving_version: int | None = None
    map_version: int | None = None
    overlay_bytes: int = 0
    pid: int | None = None
    loading: int | None = None
    load_error: LoadError | None = None
    target_map_version: int | None = None
    partitions_loading: tuple[str, ...] = ()
    partitions_draining: tuple[str, ...] = ()
    partition_error: PartitionError | None = None
    instance_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The znode's JSON object (every field, null where unset; ``instance_id`` only when set,
        so a record without one writes the bytes of before)."""
        return _with_instance(self.instance_id, {
            "node_id": self.node_id,
            "address": self.address,
            "partitions": list(self.partitions),
            "held": {name: h.to_dict() for name, h in self.held.items()},
            "memory_bytes": self.memory_bytes,
            "versions_ready": list(self.versions_ready),
            "serving_version": self.serving_version,
            "map_version": self.map_version,
            "overlay_bytes": self.overlay_bytes,
            "pid": self.pid,
            "loading": self.loading,
            "load_error": None if self.load_error is None else self.load_error.to_dict(),
            "target_map_version": self.target_map_version,
            "partitions_loading": list(self.partitions_loading),
            "partitions_draining": list(self.partitions_draining),
            "partition_error": None if self.partition_error is None else self.partition_error.to_dict(),
        })

    def to_bytes(self) -> bytes:
        return _encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "node znode", *, dialable: bool = False) -> "NodeRecord":
        """``dialable``: also refuse a record that names no address (what a frontend routes to)."""
        record = cls._read(_Fields.decode(data, where))
        if dialable and not record.address:
            raise RecordError(f"{where} names no address")
        return record

    @classmethod
    def _read(cls, f: _Fields) -> "NodeRecord":
        held = f.obj("held")
        return cls(
            node_id=f.str("node_id"),
            address=f.str("address"),
            partitions=f.strs("partitions"),
            held={} if held is None else {name: HeldPartition._read(h) for name, h in held.items()},
            memory_bytes=f.count("memory_bytes"),
            versions_ready=f.ints("versions_ready"),
            serving_version=f.int("serving_version"),
            map_version=f.int("map_version"),
            overlay_bytes=f.count("overlay_bytes"),
            pid=f.int("pid"),
            loading=f.int("loading"),
            load_error=LoadError._read(f.obj("load_error")),
            target_map_version=f.int("target_map_version"),
            partitions_loading=f.strs("partitions_loading"),
            partitions_draining=f.strs("partitions_draining"),
            partition_error=PartitionError._read(f.obj("partition_error")),
            instance_id=f.str("instance_id"),
        )


# -- frontends/<frontend_id> --------------------------------------------------------------------


@dataclass(frozen=True)
class FrontendRecord:
    """A live frontend's znode: where to dial it and the model version it serves."""

    frontend_id: str = ""
    address: str = ""
    version: int | None = None
    pid: int | None = None
    instance_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        fields = {"frontend_id": self.frontend_id, "address": self.address, "version": self.version, "pid": self.pid}
        return _with_instance(self.instance_id, fields)

    def to_bytes(self) -> bytes:
        return _encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "frontend znode") -> "FrontendRecord":
        f = _Fields.decode(data, where)
        return cls(f.str("frontend_id"), f.str("address"), f.int("version"), f.int("pid"), f.str("instance_id"))


# -- model/checkpoint, model/serving_version, model/target_version -------------------------------


@dataclass(frozen=True)
class ModelPointer:
    """Where every shard and frontend reads checkpoint versions from (``model/checkpoint``)."""

    uri: str
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri}

    def to_bytes(self) -> bytes:
        return _encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "model checkpoint znode") -> "ModelPointer":
        f = _Fields.decode(data, where)
        uri = f.str("uri")
        if not uri:
            raise RecordError(f"{where} must hold {{\"uri\": ..., \"name\": ...}} with a non-empty uri")
        return cls(uri, f.str("name"))


@dataclass(frozen=True)
class VersionRecord:
    """A model version the cluster serves or should load next (``{"version": N}``)."""

    version: int

    def to_bytes(self) -> bytes:
        return _encode({"version": self.version})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "version znode") -> "VersionRecord":
        version = _Fields.decode(data, where).int("version")
        if version is None:
            raise RecordError(f"{where} must hold {{\"version\": N}}, got {data[:80]!r}")
        return cls(version)
