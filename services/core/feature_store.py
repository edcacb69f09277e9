"""A feature store's generations in Redis: the marker that names the live generation, the keys
of every generation, and loading a new generation beside the live one. The layout, the rules
and why are in docs/features.md ("Generations and the marker").

Keys under a prefix ``P`` for model ``M`` whose user and item layouts have fingerprints ``U``
and ``I`` (``FeatureLayout.fingerprint``)::

    P g<gen>:M:U:u:<id>           a user's record in generation <gen>
    P g<gen>:M:I:i:<id>           an item's record in generation <gen>
    P features:M:U:I              the marker: JSON of FeatureMarker (live generation, counts, when)
    P features:M:U:I:lock         the lock of the one load in progress (SET NX PX, renewed)
    P features:M:U:I:generations  every generation that may have records (the live one included)
    P features:generation         the prefix's generation counter (INCR): numbers never repeat

A load deletes the generations that are not live (what a dead load or a lost marker left),
writes a whole new generation, switches the marker with one script (compare-and-set), then
deletes the generation it replaced. A reader MGETs the marker together with the records of
the generation it knows, so it never serves a half-loaded generation nor one whose marker is gone.

Pure module (no redis import): the functions that talk to Redis take an injected synchronous
client from ``services.core.clients.make_redis``, from one thread.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from services.core.errors import ResourceExhaustedError, ShardrecError, UnavailableError
from services.core.features import FeatureLayout, WriteStats, write_feature_rows

log = logging.getLogger(__name__)

MARKER_FORMAT = "shardrec.features.marker/v1"
# A load renews its lock at least this often (it expires after lock_ttl_s if the loader dies).
_RENEW_EVERY_S = 2.0

# KEYS marker, lock. ARGV token, marker expected ('' = none), new marker.
# -1: the lock is not ours any more; 0: the marker changed; 1: switched.
_SWITCH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
return 1
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped, for ``SCAN MATCH``."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True)
class StoreKeys:
    """The key names of one model's feature store under one prefix (see the module docstring)."""

    prefix: str
    model: str
    user_fingerprint: str
    item_fingerprint: str

    @classmethod
    def of(cls, prefix: str, user: FeatureLayout, item: FeatureLayout) -> "StoreKeys":
        return cls(prefix, user.spec.name, user.fingerprint, item.fingerprint)

    @property
    def marker(self) -> str:
        return f"{self.prefix}features:{self.model}:{self.user_fingerprint}:{self.item_fingerprint}"

    @property
    def lock(self) -> str:
        return f"{self.marker}:lock"

    @property
    def generations(self) -> str:
        return f"{self.marker}:generations"

    @property
    def counter(self) -> str:
        return f"{self.prefix}features:generation"

    def generation_prefix(self, generation: int) -> str:
        """What goes before ``FeatureLayout.key``'s own part: ``P g<gen>:``."""
        return f"{self.prefix}g{int(generation)}:"

    def generation_pattern(self, generation: int) -> str:
        """``SCAN MATCH`` pattern of every record of ``generation`` (both sides)."""
        return glob_escape(self.generation_prefix(generation)) + "*"


@dataclass(frozen=True)
class FeatureMarker:
    """What a finished load says about itself; ``load_id`` tells two loads apart even when a
    wiped counter gave them one generation number."""

    generation: int
    model: str
    user_fingerprint: str
    item_fingerprint: str
    users: int
    items: int
    load_id: str
    loaded_at: float  # seconds since the epoch
    source: str = ""  # checkpoint URI the rows came from
    version: int = 0  # manifest version the layouts came from

    def to_bytes(self) -> bytes:
        return json.dumps({"format": MARKER_FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, keys: StoreKeys) -> "FeatureMarker":
        """The marker stored at ``keys.marker``; ShardrecError (INTERNAL) naming the key when it is
        not one this module wrote for these layouts."""
        try:
            d = json.loads(raw)
            if d.pop("format") != MARKER_FORMAT:
                raise ValueError("unknown format")
            m = cls(**d)
            if not isinstance(m.generation, int) or m.generation < 1:
                raise ValueError(f"generation {m.generation!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ShardrecError(
                f"feature store marker {keys.marker!r} is unreadable ({e}; {bytes(raw)[:80]!r}); "
                "it is written only by 'shardrec features load': delete it and load again"
            ) from None
        if (m.model, m.user_fingerprint, m.item_fingerprint) != (keys.model, keys.user_fingerprint, keys.item_fingerprint):
            raise ShardrecError(f"feature store marker {keys.marker!r} describes another model or layout: {m}")
        return m


class LoadBusyError(UnavailableError):
    """Another load of the same store holds its lock (or took it over from this one)."""


@dataclass(frozen=True)
class LoadResult:
    """A finished load: the marker now live, the one it replaced, per side what was written,
    and how many keys of replaced or abandoned generations were deleted."""

    marker: FeatureMarker
    replaced: FeatureMarker | None
    written: tuple[WriteStats, WriteStats]  # users, items
    deleted_keys: int


def read_marker(client: Any, keys: StoreKeys) -> FeatureMarker | None:
    """The live marker, or None when there is none."""
    raw = client.get(keys.marker)
    return None if raw is None else FeatureMarker.parse(raw, keys)


def delete_generation(client: Any, keys: StoreKeys, generation: int, *, count: int = 5000) -> int:
    """UNLINK every record of ``generation`` (SCAN MATCH, ``count`` keys per command); returns how
    many were deleted. Safe while others read and write other generations."""
    deleted, chunk = 0, []
    for key in client.scan_iter(match=keys.generation_pattern(generation), count=count):
        chunk.append(key)
        if len(chunk) >= count:
            deleted += int(client.unlink(*chunk))
            chunk = []
    if chunk:
        deleted += int(client.unlink(*chunk))
    return deleted


def _is_oom(e: Exception) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or str(e).startswith("OOM ")


def load_generation(
    client: Any,
    keys: StoreKeys,
    sides: Sequence[tuple[FeatureLayout, Mapping[str, np.ndarray]]],
    *,
    source: str = "",
    version: int = 0,
    batch: int = 5000,
    only_if_missing: bool = False,
    min_generation: int = 1,
    lock_ttl_s: float = 30.0,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> LoadResult | None:
    """Write ``sides`` (the user side, then the item side: a layout and its rows, validated
    first) as a new generation, switch the marker to it, delete the generation it replaced.

    Holds the store's lock throughout (LoadBusyError when another load holds it). Generations
    that are not live (a dead load's, or all of them when the marker is gone) are deleted first. With ``only_if_missing``, returns None without
    writing when a marker exists once the lock is held (the self-healing reload: idempotent).
    ``min_generation``: the new generation's number is at least this (a reader that knew
    generation N before Redis lost the counter passes N + 1, so numbers keep growing).
    On any failure the new generation is deleted and the marker left as it was; Redis refusing
    writes for memory (``maxmemory``, ``noeviction``) is ResourceExhaustedError.
    ``progress(side, done, total, seconds)`` follows each pipelined round trip.
    """
    (user, user_rows), (item, item_rows) = sides
    for layout, rows in sides:  # every row checked before anything is written
        layout.validate(rows, np.asarray(rows.get(layout.id_key, [])))
    token = secrets.token_hex(8)
    ttl_ms = int(lock_ttl_s * 1000)
    if not client.set(keys.lock, token, nx=True, px=ttl_ms):
        left = client.pttl(keys.lock)
        raise LoadBusyError(
            f"another load of the feature store {keys.marker!r} holds its lock {keys.lock!r} "
            f"(for {max(0, int(left))} ms more unless renewed); try again when it is done",
            retry_after_s=1.0,
        )
    try:
        raw = client.get(keys.marker)
        old = None if raw is None else FeatureMarker.parse(raw, keys)
        if only_if_missing and old is not None:
            return None
        deleted = _drop_unused(client, keys, live=None if old is None else old.generation)
        generation = int(client.incr(keys.counter))
        if generation < min_generation:
            generation = min_generation
            client.set(keys.counter, generation)
        client.sadd(keys.generations, generation)
        try:
            renewed = [time.monotonic()]

            def renew(side: str, done: int, total: int, seconds: float) -> None:
                if time.monotonic() - renewed[0] >= min(_RENEW_EVERY_S, lock_ttl_s / 3):
                    if not client.eval(_RENEW, 1, keys.lock, token, ttl_ms):
                        raise LoadBusyError(f"the load of {keys.marker!r} lost its lock {keys.lock!r} (stalled past {lock_ttl_s:g} s?)")
                    renewed[0] = time.monotonic()
                if progress is not None:
                    progress(side, done, total, seconds)

            prefix = keys.generation_prefix(generation)
            written = tuple(
                write_feature_rows(client, layout, rows, prefix, batch=batch,
                                   progress=lambda d, t, s, name=name: renew(name, d, t, s))  # fmt: skip
                for name, layout, rows in (("users", user, user_rows), ("items", item, item_rows))
            )
            marker = FeatureMarker(
                generation, keys.model, keys.user_fingerprint, keys.item_fingerprint,
                users=written[0].entities, items=written[1].entities, load_id=token, loaded_at=time.time(),
                source=source, version=version,
            )  # fmt: skip
            switched = client.eval(_SWITCH, 2, keys.marker, keys.lock, token, raw or b"", marker.to_bytes())
            if switched != 1:
                raise LoadBusyError(f"the load of {keys.marker!r} lost its lock or the marker changed under it; nothing switched")
        except Exception as e:
            _abandon(client, keys, generation)
            if _is_oom(e):
                raise ResourceExhaustedError(
                    f"feature store (Redis) refused the writes of generation {generation}: out of memory ({e}). "
                    "A load needs room for two generations at once (maxmemory, noeviction); "
                    f"the live generation ({'none' if old is None else old.generation}) is untouched"
                ) from e
            raise
        if old is not None:
            deleted += delete_generation(client, keys, old.generation)
            client.srem(keys.generations, old.generation)
        return LoadResult(marker, old, written, deleted)  # type: ignore[arg-type]
    finally:
        try:
            client.eval(_RELEASE, 1, keys.lock, token)
        except Exception as e:  # noqa: BLE001 - the lock expires by itself
            log.warning("could not release the feature store lock %s: %s", keys.lock, e)


def _drop_unused(client: Any, keys: StoreKeys, live: int | None) -> int:
    """Delete every generation but ``live`` (None: all); the lock is held."""
    deleted = 0
    for raw in client.smembers(keys.generations):
        generation = int(raw)
        if generation != live:
            n = delete_generation(client, keys, generation)
            log.info("deleted %d keys of unused feature generation %d (%s)", n, generation, keys.marker)
            deleted += n
            client.srem(keys.generations, raw)
    return deleted


def _abandon(client: Any, keys: StoreKeys, generation: int) -> None:
    """Best effort after a failed load: its keys go, then its entry in the set (left there if
    Redis cannot be reached: the next load deletes it)."""
    try:
        delete_generation(client, keys, generation)
        client.srem(keys.generations, generation)
    except Exception as e:  # noqa: BLE001 - the next load cleans up
        log.warning("could not delete the abandoned feature generation %d of %s: %s", generation, keys.marker, e)
