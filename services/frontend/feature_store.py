"""``FeatureStoreClient``: the frontend's reads of the feature store in Redis, one MGET per
batch that carries the store's marker with the batch's records, so a store that was lost
(restarted empty, flushed) is noticed by the very batch that would have read nothing, and a
reload (a new generation) is followed by re-reading once. Every call is bounded by the batch's
deadline and a ceiling (``--redis-timeout-ms``) and goes through a circuit breaker
(``services.core.breaker``). docs/features.md ("Generations and the marker") and
docs/failure-modes.md have the rules.

Event loop only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from redis import exceptions as redis_errors

from services.core.breaker import BreakerPolicy, CircuitBreaker
from services.core.errors import DeadlineExceededError, ShardrecError, UnavailableError
from services.core.feature_store import FeatureMarker, StoreKeys
from services.core.features import FeatureLayout

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)


class FeatureStoreState(enum.IntEnum):
    """The ``feature_store_state`` gauge of GetStats."""

    OK = 0  # the marker was there at the last answer (or no store is configured)
    LOST = 1  # Redis answered without the marker: the records cannot be trusted to be there
    UNREACHABLE = 2  # the breaker is open or probing: Redis failed or did not answer in time


@dataclass(frozen=True)
class FeatureStoreConfig:
    """``timeout_s``: the ceiling of one call (the batch's deadline may cut it shorter).
    ``defaults_on_loss``: answer with every stored feature at its default (the response flagged
    degraded) instead of UNAVAILABLE while the store is lost or unreachable; off by default.
    ``reloads``: whether this frontend reloads a lost store itself (``FeatureSync``), for the
    messages callers see."""

    timeout_s: float = 0.2
    defaults_on_loss: bool = False
    breaker: BreakerPolicy = field(default_factory=lambda: BreakerPolicy(failures_to_open=3, open_s=0.25, open_max_s=1.0))
    reloads: bool = False


@dataclass(frozen=True)
class StoredRecords:
    """One batch's MGET replies (None: no record), parallel to its keys; ``defaults`` is True
    when the store could not be read and the operator chose defaults over failing."""

    users: list[bytes | None]
    user_keys: list[bytes]
    items: list[bytes | None]
    item_keys: list[bytes]
    defaults: bool = False


class FeatureStoreClient:
    """Reads records of one model's feature store (the user and item ``layouts``) under
    ``keys``. ``redis`` is a ``redis.asyncio.Redis`` speaking bytes, or None: no store (every
    entity missing, defaults, not degraded). ``on_change()`` is called when ``state`` changes."""

    def __init__(
        self,
        redis: "redis.asyncio.Redis | None",
        keys: StoreKeys,
        user: FeatureLayout,
        item: FeatureLayout,
        config: FeatureStoreConfig = FeatureStoreConfig(),
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._user, self._item = user, item
        self.config = config
        self._marker_key = keys.marker.encode()
        self.marker: FeatureMarker | None = None
        self._marker_raw: bytes | None = None
        self.lost = False  # the last answer had no marker
        self.breaker = CircuitBreaker(config.breaker)
        self._last_error = ""
        self.on_change: Callable[[], None] | None = None
        self._reported = FeatureStoreState.OK
        self.last_answer_at = float("-inf")  # time.monotonic() of the last answer from Redis
        # Counters (their metrics and GetStats names: services/core/metrics/frontend.py).
        self.round_trips = 0  # batch MGETs answered
        self.keys_read = 0  # record keys in them (the marker not counted)
        self.marker_reads = 0  # GETs of the marker alone (start, idle checks)
        self.lost_total = 0
        self.switches = 0  # generations followed
        self.timeouts = 0
        self.errors = 0
        self.fast_failures = 0  # calls refused at once by the open breaker
        self.defaults_served = 0  # batches answered with defaults (defaults_on_loss)

    @property
    def configured(self) -> bool:
        return self._redis is not None

    @property
    def state(self) -> FeatureStoreState:
        if self._redis is None:
            return FeatureStoreState.OK
        if self.breaker.open_until is not None:
            return FeatureStoreState.UNREACHABLE
        return FeatureStoreState.LOST if self.lost else FeatureStoreState.OK

    # -- reads ------------------------------------------------------------------------------

    async def read(self, users: np.ndarray, items: np.ndarray, deadline: float | None = None) -> StoredRecords:
        """The records of ``users`` and ``items`` (int64 ids) in one MGET with the marker, at
        the live generation; within ``deadline`` (time.monotonic()) and the ceiling.

        Raises UnavailableError naming the feature store when it is lost, fails or does not
        answer in time, or while the breaker is open (with a retry hint); unless
        ``defaults_on_loss``: then every record is missing and ``defaults`` is set.
        DeadlineExceededError when the deadline cut the wait short.
        """
        user_n = len(users) if self._user.record_bytes else 0
        item_n = len(items) if self._item.record_bytes else 0
        if self._redis is None or not user_n + item_n:
            return StoredRecords([None] * user_n, [], [None] * item_n, [])
        try:
            return await self._read(users[:user_n], items[:item_n], deadline)
        except UnavailableError:
            if not self.config.defaults_on_loss:
                raise
            self.defaults_served += 1
            return StoredRecords([None] * user_n, [], [None] * item_n, [], defaults=True)
        finally:
            self._report()

    async def _read(self, users: np.ndarray, items: np.ndarray, deadline: float | None) -> StoredRecords:
        if self.marker is None:
            await self._refresh(deadline)
            if self.marker is None:
                raise self._lost_error()
        generation = self.marker.generation
        for _ in range(2):  # a switch of generations is re-read once
            prefix = self.keys.generation_prefix(generation)
            user_keys, item_keys = self._user.keys(prefix, users), self._item.keys(prefix, items)
            keys = [self._marker_key, *user_keys, *item_keys]
            blobs = await self._call(lambda: self._redis.mget(keys), deadline)  # type: ignore[union-attr]
            self.round_trips += 1
            self.keys_read += len(keys) - 1
            if not self._saw(blobs[0]):
                raise self._lost_error()
            if self.marker.generation == generation:  # type: ignore[union-attr]
                nu = len(user_keys)
                return StoredRecords(blobs[1 : 1 + nu], user_keys, blobs[1 + nu :], item_keys)
            generation = self.marker.generation  # type: ignore[union-attr]
        raise UnavailableError("feature store (Redis) switched generations twice during one batch; retry", retry_after_s=0.05)

    async def refresh(self, deadline: float | None = None) -> FeatureStoreState:
        """GET the marker alone (at start, and when no batch read it lately): the state it
        leaves. Raises like ``read`` (never falls back to defaults)."""
        if self._redis is None:
            return self.state
        try:
            await self._refresh(deadline)
        finally:
            self._report()
        return self.state

    async def _refresh(self, deadline: float | None) -> None:
        raw = await self._call(lambda: self._redis.get(self._marker_key), deadline)  # type: ignore[union-attr]
        self.marker_reads += 1
        self._saw(raw)

    def _saw(self, raw: bytes | None) -> bool:
        """Take in the marker of an answer; False when it is missing (the store is lost)."""
        if raw is None:
            if not self.lost:
                self.lost = True
                self.lost_total += 1
                log.warning("feature store lost: no marker %r in Redis; stored features cannot be read", self.keys.marker)
            return False
        if raw != self._marker_raw:
            marker = FeatureMarker.parse(raw, self.keys)
            if self.marker is not None:
                self.switches += 1
            log.info("feature store: generation %d (%d users, %d items, load %s)", marker.generation, marker.users, marker.items, marker.load_id)
            self.marker, self._marker_raw = marker, raw
        if self.lost:
            log.info("feature store found again at generation %d", self.marker.generation)  # type: ignore[union-attr]
            self.lost = False
        return True

    # -- one bounded call through the breaker ----------------------------------------------------

    async def _call(self, call: Callable[[], Awaitable[Any]], deadline: float | None) -> Any:
        now = time.monotonic()
        if not self.breaker.usable(now):
            self.fast_failures += 1
            wait_s = max(0.05, self.breaker.retry_after_s(now))
            raise UnavailableError(
                f"feature store (Redis) unavailable: {self._last_error}; not tried again for {wait_s * 1e3:.0f} ms",
                retry_after_s=wait_s,
            )
        ceiling = self.config.timeout_s
        budget = ceiling if deadline is None else min(ceiling, deadline - now)
        probe = self.breaker.begin(now)
        try:
            result = await asyncio.wait_for(call(), max(budget, 0.001))
        except TimeoutError:
            if budget >= ceiling / 2:  # long enough for Redis to be to blame (a healthy one answers in ms)
                self.timeouts += 1
                error = self._failed(f"no answer within {budget * 1e3:.0f} ms (--redis-timeout-ms {ceiling * 1e3:.0f})")
                if budget >= ceiling:
                    raise error from None
            raise DeadlineExceededError(f"the deadline passed while reading the feature store (Redis), after {budget * 1e3:.0f} ms") from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            self.errors += 1
            raise self._failed(str(e) or type(e).__name__) from e
        except redis_errors.RedisError as e:
            self.errors += 1
            raise ShardrecError(f"feature store (Redis) refused a read: {e}") from e
        finally:
            self.breaker.end(probe)
        self.breaker.succeeded()
        self.last_answer_at = time.monotonic()
        return result

    def _failed(self, why: str) -> UnavailableError:
        now = time.monotonic()
        self._last_error = why
        if self.breaker.failed(now):
            log.warning("feature store (Redis) breaker open for %.0f ms: %s", self.breaker.retry_after_s(now) * 1e3, why)
        return UnavailableError(f"feature store (Redis) unavailable: {why}", retry_after_s=self.breaker.retry_after_s(now) or None)

    def _lost_error(self) -> UnavailableError:
        heal = ("this frontend's feature sync reloads it from the checkpoint" if self.config.reloads
                else "load it again with 'shardrec features load'")  # fmt: skip
        return UnavailableError(
            f"feature store lost: no marker {self.keys.marker!r} in Redis (restarted without its data, flushed, or "
            f"never loaded), so stored features cannot be trusted; {heal}",
            retry_after_s=1.0,
        )

    def _report(self) -> None:
        state = self.state
        if state is not self._reported:
            self._reported = state
            if self.on_change is not None:
                self.on_change()
