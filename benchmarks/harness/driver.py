"""Load drivers on asyncio: an open loop (fixed arrival rate) and a closed loop (N clients).

What a run measures (``run_load`` returns a ``RunStats``):

- **Open loop** (``OpenLoop``): arrivals follow a schedule fixed in advance (Poisson by default,
  seeded; or evenly spaced). Request ``i`` has an *intended* send time ``t_i``; a task is
  launched for it at ``t_i`` and its latency is ``completion - t_i``. If the client falls behind
  (its loop stalls, the machine is saturated), requests are sent late but still count the wait
  from ``t_i``: coordinated omission cannot hide queueing. ``service_histogram`` holds
  ``completion - actual send`` of the same calls (the naive figure) and ``send_lag`` holds
  ``actual send - t_i``, so the client's own lag is visible. At most ``max_in_flight`` calls
  are outstanding; an arrival beyond that is not sent and counts as ``client_overloaded``
  (and as an error in ``error_share``).
- **Closed loop** (``ClosedLoop``): ``concurrency`` workers, each sending its next request when
  the previous one ended; latency = completion - send.
- Both: each call runs under ``deadline_s`` (the gRPC deadline for ``RecommenderClient``; an
  asyncio timeout around any call), failures are counted by gRPC status name
  (``DEADLINE_EXCEEDED``, ``UNAVAILABLE``, ...; an exception that carries no status is
  ``CLIENT_ERROR``) with the first message of each kept in ``error_samples``. Requests whose
  intended (open) or actual (closed) send time falls in the warm-up are left out of every
  statistic. Throughput = successful completions inside the measured window / its length.
  Latency histograms hold successful calls only; failures are in ``errors``.

Timer resolution: on the default asyncio loop, sleeps wake on a 1 ms epoll tick, so an
open-loop request typically leaves 0-1 ms after its intended time (``send_lag``); that lag is
counted in the latency (it is real client delay). ``run(coro)`` runs on a ``select()`` loop
whose timers wake within ~0.1 ms; use it from a command line.

The target is any ``async def call(request)`` (tests, in-process baselines) or a
``RecommenderClient`` (a fixed set of grpc.aio channels, round robin; never a channel per call).
Everything runs on the caller's event loop; ``run_load`` must be awaited from it.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import selectors
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from benchmarks.harness.histogram import LatencyHistogram
from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.clients import make_channel

Request = recommend_pb2.RecommendRequest
Call = Callable[[Any], Awaitable[Any]]
RequestSource = Callable[[int], Any]

DEFAULT_DEADLINE_S = 1.0
DEFAULT_MAX_IN_FLIGHT = 10_000
CLIENT_ERROR = "CLIENT_ERROR"
CLIENT_OVERLOADED = "CLIENT_OVERLOADED"
_MAX_SAMPLE_CHARS = 300


# -- load shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenLoop:
    """Fixed arrival rate. ``arrivals``: ``"poisson"`` (exponential gaps from ``seed``) or
    ``"uniform"`` (evenly spaced). The schedule runs ``warmup_s + duration_s``."""

    rate_rps: float
    duration_s: float
    warmup_s: float = 0.0
    arrivals: str = "poisson"
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    seed: int = 0

    mode = "open"

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")
        _check_window(self.duration_s, self.warmup_s)
        if self.arrivals not in ("poisson", "uniform"):
            raise ValueError(f"arrivals must be 'poisson' or 'uniform', got {self.arrivals!r}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")

    def describe(self) -> dict:
        return {"mode": self.mode, **asdict(self)}


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` clients, each with one call in flight, for ``warmup_s + duration_s``."""

    concurrency: int
    duration_s: float
    warmup_s: float = 0.0

    mode = "closed"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        _check_window(self.duration_s, self.warmup_s)

    def describe(self) -> dict:
        return {"mode": self.mode, **asdict(self)}


def _check_window(duration_s: float, warmup_s: float) -> None:
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if warmup_s < 0:
        raise ValueError(f"warmup_s must be >= 0, got {warmup_s}")


Load = OpenLoop | ClosedLoop


# -- errors --------------------------------------------------------------------------------


class CallError(Exception):
    """What a plain ``async def call(request)`` raises to fail with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status_name(exc: BaseException) -> str:
    """The gRPC status name of a failed call: ``exc.code()`` when it is a ``grpc.StatusCode``
    (grpc.aio.AioRpcError, grpc.RpcError, CallError), ``DEADLINE_EXCEEDED`` for a timeout,
    else ``CLIENT_ERROR``."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            c = code()
        except Exception:  # noqa: BLE001 - a foreign exception's code() may do anything
            c = None
        if isinstance(c, grpc.StatusCode):
            return c.name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return CLIENT_ERROR


def _error_message(exc: BaseException, status: str) -> str:
    details = getattr(exc, "details", None)
    msg = None
    if callable(details):
        try:
            msg = details()
        except Exception:  # noqa: BLE001
            msg = None
    if not msg:
        msg = str(exc) or type(exc).__name__
    if status == CLIENT_ERROR or isinstance(exc, TimeoutError):
        msg = f"{type(exc).__name__}: {msg}"
    return msg[:_MAX_SAMPLE_CHARS]


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One live progress report. ``phase``: warmup, measure, drain or done. Counts cover the
    whole run so far (warm-up included); ``p99_ms`` covers the measured window so far and
    ``p99_ms_interval`` the last interval (both successful calls only)."""

    phase: str
    elapsed_s: float
    sent: int
    done: int
    errors: int
    in_flight: int
    rps: float
    p99_ms_interval: float
    p99_ms: float
    client_overloaded: int = 0

    def line(self) -> str:
        over = f" overloaded {self.client_overloaded}" if self.client_overloaded else ""
        return (
            f"[{self.phase:<7} {self.elapsed_s:6.1f}s] sent {self.sent} done {self.done} errors {self.errors}"
            f" in-flight {self.in_flight}{over} | {self.rps:,.0f} rps | p99 {self.p99_ms_interval:.2f} ms"
            f" (last interval) {self.p99_ms:.2f} ms (run)"
        )


@dataclass
class RunStats:
    """What one run measured, warm-up excluded (see the module docstring for definitions)."""

    load: dict
    deadline_s: float
    duration_s: float
    warmup_s: float
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    service_histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    send_lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    scheduled: int = 0
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    client_overloaded: int = 0
    completed_in_window: int = 0
    total_sent: int = 0
    started_unix: float = 0.0

    @property
    def mode(self) -> str:
        return self.load["mode"]

    @property
    def offered_rps(self) -> float | None:
        return self.load.get("rate_rps")

    @property
    def concurrency(self) -> int | None:
        return self.load.get("concurrency")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput_rps(self) -> float:
        return self.completed_in_window / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_share(self) -> float:
        """(failed + not sent for client overload) / requests the run asked for."""
        asked = max(self.scheduled, self.sent)
        return (self.error_count + self.client_overloaded) / asked if asked else 0.0

    @property
    def p99_ms(self) -> float:
        return self.histogram.percentile_ms(99.0)

    def errors_with_overload(self) -> dict[str, int]:
        out = dict(sorted(self.errors.items()))
        if self.client_overloaded:
            out[CLIENT_OVERLOADED] = self.client_overloaded
        return out


# -- meters hooked to the measured window --------------------------------------------------


class WindowMeter(Protocol):
    """Started when the measured window opens, stopped when it closes (``CpuMeter``,
    ``CounterMeter``). ``start``/``stop`` may be plain or async; an optional ``tick()`` is
    called at every progress interval."""

    def start(self) -> Any: ...

    def stop(self) -> Any: ...


async def _maybe_await(x: Any) -> None:
    if inspect.isawaitable(x):
        await x


# -- the run -------------------------------------------------------------------------------


class _Run:
    """State of one run; lives on one event loop."""

    def __init__(
        self,
        call: Call,
        requests: RequestSource,
        load: Load,
        deadline_s: float,
        progress: Callable[[Progress], None] | None,
        progress_interval_s: float,
        meters: Sequence[WindowMeter],
    ) -> None:
        self.call = call
        self.requests = requests
        self.load = load
        self.deadline_s = deadline_s
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.meters = list(meters)
        self.clock = time.perf_counter
        self.stats = RunStats(load=load.describe(), deadline_s=deadline_s, duration_s=load.duration_s, warmup_s=load.warmup_s)
        self.tasks: set[asyncio.Task] = set()
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.interval_done = 0
        self.interval_hist = LatencyHistogram()
        self.index = itertools.count()
        self.t0 = self.w0 = self.w1 = 0.0
        self.scheduling = True

    async def run(self) -> RunStats:
        self.stats.started_unix = time.time()
        self.t0 = self.clock()
        self.w0 = self.t0 + self.load.warmup_s
        self.w1 = self.w0 + self.load.duration_s
        drive = asyncio.create_task(self._drive())
        window = asyncio.create_task(self._window())
        reporter = asyncio.create_task(self._report()) if self.progress or self.meters else None
        helpers = [t for t in (window, reporter) if t is not None]
        try:
            # A failing meter or progress callback ends the run at once, not after it.
            waiting: set[asyncio.Task] = {drive, *helpers}
            while not drive.done():
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not drive and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            drive.result()
            await window  # the meters stopped at the window's end
        finally:
            self.scheduling = False
            leftovers = [t for t in (drive, *helpers, *self.tasks) if not t.done()]
            for t in leftovers:
                t.cancel()
            if leftovers:
                await asyncio.gather(*leftovers, return_exceptions=True)
        if self.progress is not None:
            self.progress(self._snapshot("done"))
        return self.stats

    async def _drive(self) -> None:
        """Send the load, then wait for every call still in flight (each bounded by the deadline)."""
        if isinstance(self.load, OpenLoop):
            await self._open_loop(self.load)
        else:
            await asyncio.gather(*(self._worker() for _ in range(self.load.concurrency)))
        self.scheduling = False
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    # Open loop: launch each request at its intended time.
    async def _open_loop(self, load: OpenLoop) -> None:
        rng = np.random.default_rng(load.seed)
        mean_gap = 1.0 / load.rate_rps

        def gaps():
            while True:
                if load.arrivals == "uniform":
                    yield from itertools.repeat(mean_gap, 4096)
                else:
                    yield from rng.exponential(mean_gap, size=4096).tolist()

        gap = gaps()
        intended = self.t0
        st = self.stats
        while intended < self.w1:
            i = next(self.index)
            req = self.requests(i)  # built before the wait, so it is not in the latency
            delay = intended - self.clock()
            await asyncio.sleep(delay if delay > 0 else 0)
            measured = intended >= self.w0
            if measured:
                st.scheduled += 1
            if len(self.tasks) >= load.max_in_flight:
                if measured:
                    st.client_overloaded += 1
            else:
                task = asyncio.create_task(self._one(req, intended, measured, open_loop=True))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            intended += next(gap)

    # Closed loop: one call in flight per worker.
    async def _worker(self) -> None:
        while True:
            if self.clock() >= self.w1:
                return
            req = self.requests(next(self.index))
            t = self.clock()
            if t >= self.w1:
                return
            measured = t >= self.w0
            if measured:
                self.stats.scheduled += 1
            await self._one(req, t, measured, open_loop=False)

    async def _one(self, req: Any, intended: float, measured: bool, *, open_loop: bool) -> None:
        st = self.stats
        self.in_flight += 1
        st.total_sent += 1
        t_send = self.clock()
        status = message = None
        deadline = asyncio.timeout(self.deadline_s)
        try:
            async with deadline:
                await self.call(req)
        except Exception as e:  # noqa: BLE001 - every failure is counted by status, none is fatal
            if deadline.expired():  # ours; grpc.aio may report it as TimeoutError or CANCELLED
                status = grpc.StatusCode.DEADLINE_EXCEEDED.name
                message = f"no answer within the {self.deadline_s:g} s deadline (client-side timeout)"
            else:
                status = status_name(e)
                if status not in st.error_samples:
                    message = _error_message(e, status)
        finally:
            self.in_flight -= 1
        t_done = self.clock()
        self.done += 1
        if status is None:
            latency = t_done - intended
            self.interval_done += 1
            self.interval_hist.record(latency)
            if self.w0 <= t_done < self.w1:
                st.completed_in_window += 1
        else:
            self.failed += 1
        if not measured:
            return
        st.sent += 1
        if open_loop:
            st.send_lag.record(t_send - intended)
        if status is None:
            st.ok += 1
            st.histogram.record(t_done - intended)
            st.service_histogram.record(t_done - t_send)
        else:
            st.errors[status] = st.errors.get(status, 0) + 1
            if status not in st.error_samples and message:
                st.error_samples[status] = message

    async def _window(self) -> None:
        """Start the meters when the measured window opens; stop them when it closes."""
        if not self.meters:
            return
        await asyncio.sleep(max(0.0, self.w0 - self.clock()))
        for m in self.meters:
            await _maybe_await(m.start())
        await asyncio.sleep(max(0.0, self.w1 - self.clock()))
        for m in self.meters:
            await _maybe_await(m.stop())

    async def _report(self) -> None:
        last = self.clock()
        while True:
            await asyncio.sleep(self.progress_interval_s)
            now = self.clock()
            if self.w0 <= now < self.w1:
                for m in self.meters:
                    tick = getattr(m, "tick", None)
                    if tick is not None:
                        await _maybe_await(tick())
            if self.progress is not None:
                self.progress(self._snapshot(self._phase(now), interval_s=now - last))
            self.interval_done = 0
            self.interval_hist.reset()
            last = now

    def _phase(self, now: float) -> str:
        if now < self.w0:
            return "warmup"
        if now < self.w1 and self.scheduling:
            return "measure"
        return "drain"

    def _snapshot(self, phase: str, interval_s: float = 0.0) -> Progress:
        st = self.stats
        return Progress(
            phase=phase,
            elapsed_s=self.clock() - self.t0,
            sent=st.total_sent,
            done=self.done,
            errors=self.failed,
            in_flight=self.in_flight,
            rps=self.interval_done / interval_s if interval_s > 0 else st.throughput_rps,
            p99_ms_interval=self.interval_hist.percentile_ms(99.0),
            p99_ms=st.histogram.percentile_ms(99.0),
            client_overloaded=st.client_overloaded,
        )


async def run_load(
    call: Call,
    requests: RequestSource,
    load: Load,
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 1.0,
    meters: Sequence[WindowMeter] = (),
) -> RunStats:
    """Drive ``call`` with ``requests(0), requests(1), ...`` shaped by ``load``.

    ``call``: ``async def call(request)`` (return value ignored; raise to fail, ideally with a
    ``.code()`` such as ``CallError`` or grpc's ``AioRpcError``) or a connected
    ``RecommenderClient``. ``requests``: ``i -> request`` (a ``RequestMix``). ``progress`` is
    called every ``progress_interval_s`` with a ``Progress`` and once at the end (phase
    ``done``). ``meters`` are started/stopped at the edges of the measured window.
    Returns after every call has ended (each is bounded by ``deadline_s``).
    """
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
    if not progress_interval_s > 0:
        raise ValueError(f"progress_interval_s must be > 0, got {progress_interval_s}")
    return await _Run(call, requests, load, deadline_s, progress, progress_interval_s, meters).run()


# -- event loop ----------------------------------------------------------------------------


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop on ``select()``: timers wake within ~0.1 ms instead of the 1 ms epoll
    tick of the default loop, so open-loop requests leave closer to their intended time
    (measured here: send lag p50 0.25 ms vs 0.7 ms at 200 rps). grpc.aio runs on it unchanged.
    ``select`` handles at most 1024 file descriptors: plenty for a load client."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def run(coro: Awaitable[Any]) -> Any:
    """``asyncio.run`` on a ``precise_event_loop``: how a command line should drive a run."""
    with asyncio.Runner(loop_factory=precise_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# -- the gRPC target -----------------------------------------------------------------------


class RecommenderClient:
    """``shardrec.v1.Recommender/Recommend`` over ``channels`` grpc.aio channels (round robin),
    each call under ``deadline_s``. Create, use and close it on one event loop::

        async with RecommenderClient("127.0.0.1:50051", deadline_s=1.0) as client:
            stats = await run_load(client, mix, OpenLoop(200, 10, 2), deadline_s=1.0)

    Several channels open separate TCP connections (a local subchannel pool each), which
    spreads the client's HTTP/2 framing when one connection is the bottleneck. With
    authentication on (docs/security.md), ``token`` is sent as ``authorization: Bearer`` (a
    callable is asked per call, so a rotated token is picked up) and ``tls_ca`` is the CA that
    signs the frontend's certificate (TLS on).
    """

    def __init__(
        self,
        address: str,
        *,
        channels: int = 1,
        deadline_s: float = DEFAULT_DEADLINE_S,
        options: Sequence[tuple[str, Any]] = (),
        token: str | Callable[[], str] | None = None,
        tls_ca: str = "",
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.address = address
        self.deadline_s = deadline_s
        self._n = channels
        self._options = list(options)
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[Any] = []
        self._next = itertools.cycle(range(channels))
        self._token = (lambda: token) if isinstance(token, str) else token
        self._tls_ca = tls_ca

    async def connect(self, timeout_s: float = 10.0) -> RecommenderClient:
        """Open the channels and wait until each is READY (TimeoutError after ``timeout_s``)."""
        if self._channels:
            return self
        opts = list(self._options)
        if self._n > 1:
            opts.append(("grpc.use_local_subchannel_pool", 1))
        creds = None
        if self._tls_ca:
            from services.core.tls import client_credentials

            creds = client_credentials(self._tls_ca)
        self._channels = [make_channel(self.address, options=opts, credentials=creds) for _ in range(self._n)]
        self._stubs = [recommend_pb2_grpc.RecommenderStub(ch) for ch in self._channels]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(ch.channel_ready() for ch in self._channels))
        except TimeoutError:
            await self.close()
            raise TimeoutError(f"Recommender at {self.address} not reachable within {timeout_s:.1f} s") from None
        return self

    async def __call__(self, request: Request) -> recommend_pb2.RecommendResponse:
        metadata = None if self._token is None else (("authorization", f"Bearer {self._token()}"),)
        return await self._stubs[next(self._next)].Recommend(request, timeout=self.deadline_s, metadata=metadata)

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        for ch in channels:
            await ch.close()

    async def __aenter__(self) -> RecommenderClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def run_recommender(
    address: str,
    requests: RequestSource,
    load: Load,
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    channels: int = 1,
    progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 1.0,
    meters: Sequence[WindowMeter] = (),
    connect_timeout_s: float = 10.0,
    token: str | None = None,
    tls_ca: str = "",
) -> RunStats:
    """``run_load`` against the Recommender at ``address`` (channels opened and closed here;
    ``token`` and ``tls_ca`` as ``RecommenderClient``'s)."""
    client = RecommenderClient(address, channels=channels, deadline_s=deadline_s, token=token, tls_ca=tls_ca)
    await client.connect(connect_timeout_s)
    try:
        return await run_load(
            client,
            requests,
            load,
            deadline_s=deadline_s,
            progress=progress,
            progress_interval_s=progress_interval_s,
            meters=meters,
        )
    finally:
        await client.close()
