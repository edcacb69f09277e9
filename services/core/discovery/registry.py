"""Membership: one ephemeral znode that says "this process is alive and ready".

A shard registers ``ZkPaths.node(node_id)`` once its partitions are loaded and it serves; a
frontend registers ``ZkPaths.frontend(frontend_id)``. The znode lives as long as the process's
ZooKeeper session. Ownership never comes from here: it comes from the ShardMap.

Threads: ``register``, ``update`` and ``deregister`` are called from the owner's thread (any
thread but a kazoo callback thread; they block on ZooKeeper round trips, and kazoo holds a
request made while the connection is down until it comes back). ``_on_state`` is
called by kazoo on its connection thread and only hands off: it spawns ``_reconcile`` on a
kazoo handler thread, which re-creates the znode after the session was LOST (expired) and the
client connected again with a new session. One lock serialises everything that touches the
znode, so the methods are thread-safe. The optional ``probe`` (``services.core.rpc.probe``)
blocks for up to its timeout on the thread that runs ``_ensure_present``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Generic, TypeVar

from kazoo.exceptions import BadVersionError, ConnectionLoss, NodeExistsError, NoNodeError
from kazoo.protocol.states import KazooState

from services.core.discovery.records import ZnodeRecord
from services.core.discovery.watches import CONNECTION_ERRORS as _CONNECTION_ERRORS
from services.core.errors import ConfigError, UnavailableError

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger(__name__)

T = TypeVar("T", bound="ZnodeRecord | bytes")
# ``probe(data)``: does the process that wrote ``data`` (another session's znode at our path)
# still answer as itself? (``services.core.rpc.probe.holder_probe``)
HolderProbe = Callable[[bytes], bool]
PROBE_INTERVAL_S = 1.0  # while the holder answers as itself, it is probed again this often


def _encode(record: "ZnodeRecord | bytes") -> bytes:
    return record if isinstance(record, bytes) else record.to_bytes()


class NodeRegistration(Generic[T]):
    """Keeps one EPHEMERAL znode at ``path`` holding ``record`` (a ``NodeRecord`` or
    ``FrontendRecord`` of ``records.py``, or bytes already encoded), across session losses.

    - ``register()`` creates it (parents too). A node left at ``path`` by an older session of
      this object is replaced. A node held by another session: with a ``probe``, it is taken
      over at once when the process that wrote it no longer answers as itself (a restarted
      process finds its crashed predecessor's znode, whose session lives until it times out);
      otherwise (or without a probe) it is waited for up to ``stale_wait_s``, probed again
      every second; if it is still there, ``register`` raises ConfigError: two live processes
      were given the same node id.
    - ``update(record)`` replaces the data (e.g. a new ready version).
    - ``deregister()`` deletes the znode if this object holds it; idempotent.
    - After a session expiry (kazoo state LOST, then CONNECTED with a new session) the znode
      is created again with the latest data, on a kazoo handler thread.

    ``stale_wait_s`` defaults to twice the client's session timeout.
    """

    def __init__(
        self,
        client: "KazooClient",
        path: str,
        record: T,
        *,
        stale_wait_s: float | None = None,
        probe: HolderProbe | None = None,
    ) -> None:
        self._client = client
        self._path = path
        self._payload = _encode(record)
        self._record = record
        if stale_wait_s is None:
            stale_wait_s = 2.0 * getattr(client, "_session_timeout", 10_000) / 1000.0
        self._stale_wait_s = stale_wait_s
        self._probe = probe
        self._lock = threading.RLock()
        self._wanted = False  # between register() and deregister()
        self._pending_delete = False  # deregister() could not reach ZooKeeper
        self._listening = False
        self._our_sessions: set[int] = set()  # every session that created the znode
        self._holder_session: int | None = None  # the session that holds it now, as far as we know
        self._last_error: BaseException | None = None

    # -- public API (owner's thread) -------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def record(self) -> T:
        """What the znode holds (or will hold once ZooKeeper is reachable): the last record given."""
        with self._lock:
            return self._record

    @property
    def session_id(self) -> int | None:
        """The session that last created or confirmed the znode (None when not registered)."""
        with self._lock:
            return self._holder_session

    @property
    def last_error(self) -> BaseException | None:
        """The error of the last background re-registration, if it failed (else None)."""
        with self._lock:
            return self._last_error

    def register(self) -> None:
        """Create the znode (or take over our own stale one) and keep it across session losses.

        Blocks for up to ``stale_wait_s`` when another session's znode is at ``path``. Raises
        ConfigError if that session stays alive (same node id twice), UnavailableError if
        ZooKeeper is unreachable.
        """
        with self._lock:
            self._wanted = True
            self._pending_delete = False
            self._listen()
            self._zk_call("register", self._ensure_present)

    def update(self, record: T) -> None:
        """Replace the data with ``record``. If the client is disconnected, return at once: the
        data is written when it reconnects (never lost, never raised about); other errors are
        raised. (If the connection drops during the call, kazoo holds the request until it
        reconnects.)"""
        payload = _encode(record)
        with self._lock:
            self._record = record
            self._payload = payload
            if not self._wanted:
                return
            if not self._client.connected:
                log.info("registration %s: update deferred until ZooKeeper reconnects", self._path)
                return
            try:
                self._ensure_present()
            except _CONNECTION_ERRORS as e:
                log.warning("registration %s: update deferred until ZooKeeper reconnects (%r)", self._path, e)

    def deregister(self) -> None:
        """Delete the znode if this object holds it; idempotent. If ZooKeeper is unreachable,
        it is deleted on reconnection, or vanishes with the session."""
        with self._lock:
            self._wanted = False
            try:
                self._ensure_absent()
            except _CONNECTION_ERRORS as e:
                self._pending_delete = True
                log.warning("registration %s: delete deferred until ZooKeeper reconnects (%r)", self._path, e)
                return
            self._pending_delete = False
            self._unlisten()

    # -- kazoo threads -----------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        """Kazoo connection thread: never touch ZooKeeper here, only hand off."""
        if state == KazooState.CONNECTED:
            self._client.handler.spawn(self._reconcile)

    def _reconcile(self) -> None:
        """Kazoo handler thread: make ZooKeeper match what the owner asked for."""
        with self._lock:
            try:
                if self._wanted:
                    self._ensure_present()
                elif self._pending_delete:
                    self._ensure_absent()
                    self._pending_delete = False
                    self._unlisten()
                self._last_error = None
            except _CONNECTION_ERRORS as e:  # the next CONNECTED tries again
                log.info("registration %s: reconcile interrupted (%r)", self._path, e)
            except Exception as e:
                self._last_error = e
                log.error("registration %s: re-registration failed: %s", self._path, e)

    # -- internals (hold self._lock) --------------------------------------------------------
    def _listen(self) -> None:
        if not self._listening:
            self._client.add_listener(self._on_state)
            self._listening = True

    def _unlisten(self) -> None:
        if self._listening:
            self._client.remove_listener(self._on_state)
            self._listening = False

    def _zk_call(self, what: str, fn) -> None:  # noqa: ANN001
        try:
            fn()
        except _CONNECTION_ERRORS as e:
            raise UnavailableError(f"cannot {what} {self._path}: ZooKeeper unreachable ({e!r})") from e

    def _current_session(self) -> int:
        cid = self._client.client_id
        if cid is None:
            raise ConnectionLoss("not connected")
        return cid[0]

    def _ensure_present(self) -> None:
        deadline = time.monotonic() + self._stale_wait_s
        while True:
            session = self._current_session()
            try:
                self._client.create(self._path, self._payload, ephemeral=True, makepath=True)
            except NodeExistsError:
                pass
            else:
                self._our_sessions.add(session)
                self._holder_session = session
                log.info("registered %s (session 0x%x)", self._path, session)
                return
            try:
                data, stat = self._client.get(self._path)
            except NoNodeError:
                continue  # vanished in between: create again
            owner = stat.ephemeralOwner
            if owner == session:
                if data != self._payload:
                    try:
                        self._client.set(self._path, self._payload, version=stat.version)
                    except (BadVersionError, NoNodeError):
                        continue
                self._our_sessions.add(session)
                self._holder_session = session
                return
            if owner in self._our_sessions:  # left by an older session of ours
                try:
                    self._client.delete(self._path, version=stat.version)
                except (BadVersionError, NoNodeError):
                    pass
                continue
            if owner == 0:
                raise ConfigError(f"{self._path} is a persistent znode; a registration must be ephemeral")
            if self._probe is not None and not self._holder_answers(data):
                log.warning(
                    "%s: taking over the znode of session 0x%x, whose process no longer answers as itself", self._path, owner
                )
                try:
                    self._client.delete(self._path, version=stat.version)
                except (BadVersionError, NoNodeError):
                    pass
                continue
            now = time.monotonic()
            if now >= deadline:
                answers = "; it answers as the instance it recorded" if self._probe is not None else ""
                raise ConfigError(
                    f"{self._path} is held by another live ZooKeeper session 0x{owner:x} "
                    f"(data {data.decode(errors='replace')}){answers}: two processes were given the same id"
                )
            self._wait_gone(min(deadline, now + PROBE_INTERVAL_S) if self._probe is not None else deadline)

    def _holder_answers(self, data: bytes) -> bool:
        try:
            return self._probe(data)
        except Exception as e:  # a probe that cannot tell: the holder's session decides
            log.warning("registration %s: probing the holder failed (%r)", self._path, e)
            return True

    def _wait_gone(self, until: float) -> bool:
        """Block until the znode is deleted (True) or ``until`` passes (False); uses a watch."""
        while True:
            gone = threading.Event()
            if self._client.exists(self._path, watch=lambda _event: gone.set()) is None:
                return True
            remaining = until - time.monotonic()
            if remaining <= 0 or not gone.wait(remaining):
                return False

    def _ensure_absent(self) -> None:
        while True:
            try:
                _data, stat = self._client.get(self._path)
            except NoNodeError:
                break
            if stat.ephemeralOwner not in self._our_sessions:
                log.warning(
                    "deregister %s: the znode belongs to session 0x%x, not ours; left alone",
                    self._path,
                    stat.ephemeralOwner,
                )
                break
            try:
                self._client.delete(self._path, version=stat.version)
            except BadVersionError:
                continue
            except NoNodeError:
                pass
            log.info("deregistered %s", self._path)
            break
        self._holder_session = None
