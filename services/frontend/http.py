"""The frontend's REST endpoint (docs/http.md), on aiohttp, on the frontend's event loop:
``POST /v1/recommend`` takes and returns the proto3 JSON mapping of RecommendRequest /
RecommendResponse and calls the same ``Recommender.recommend`` as gRPC (same validation,
admission, batcher and pipeline); errors are ``services.core.rpc.errors.http_error`` (the HTTP
code of the gRPC status, Google's JSON error body, Retry-After). ``/healthz`` answers while the
process runs; ``/readyz`` is the gRPC health status of ``shardrec.v1.Recommender``;
``/openapi.json`` is ``openapi.document()``.

Why aiohttp: measured against starlette on uvicorn (httptools), same handler, same loop: 420
vs 440 us of server CPU per request (gRPC: 375), and fewer dependencies.

Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Mapping

from aiohttp import web
from google.protobuf import json_format

from services._proto.shardrec.v1 import recommend_pb2
from services.core.auth import Access, AccessPolicy, bearer
from services.core.errors import InvalidArgumentError, ResourceExhaustedError
from services.core.rpc.errors import http_error
from services.core.tls import TlsMaterial
from services.core.tracing import extract
from services.frontend.openapi import TIMEOUT_HEADER, document
from services.frontend.recommender import Recommender
from services.frontend.servicer import caller_of, to_response

log = logging.getLogger(__name__)



def parse_json_request(body: bytes) -> recommend_pb2.RecommendRequest:
    """A RecommendRequest from its proto3 JSON; INVALID_ARGUMENT naming the problem when not."""
    try:
        return json_format.Parse(body, recommend_pb2.RecommendRequest())
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        raise InvalidArgumentError(f"malformed RecommendRequest JSON ({len(body)} bytes): {e}") from None


def timeout_of(headers: Mapping[str, str]) -> float | None:
    """The ``X-Shardrec-Timeout-Ms`` deadline in seconds, None when absent."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not 0 < ms < 1e9:
        raise InvalidArgumentError(f"{TIMEOUT_HEADER} = {raw!r}: must be a number of milliseconds > 0", field=TIMEOUT_HEADER)
    return ms / 1000.0


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def _error(exc: BaseException, http: int | None = None) -> web.Response:
    code, body, headers = http_error(exc)
    if http is not None:
        code = body["error"]["code"] = http
    return _json(code, body, headers)


class RestEndpoint:
    """The REST endpoint of one frontend. ``ready()`` says whether the Recommender is SERVING;
    ``access`` authenticates a request as it does a gRPC call (the ``Authorization: Bearer``
    header; without tokens, the ``X-Shardrec-Caller`` header names the caller); ``tls`` serves
    HTTPS, its certificate reloaded when the files change."""

    def __init__(
        self,
        recommender: Recommender,
        ready: Callable[[], bool],
        *,
        max_request_bytes: int,
        access: AccessPolicy | None = None,
        tls: TlsMaterial | None = None,
    ) -> None:
        self._recommender = recommender
        self._ready = ready
        self._max_request_bytes = max_request_bytes
        self._access = access or AccessPolicy()
        self._tls = tls
        self._reload_task: asyncio.Task | None = None
        self._openapi = json.dumps(document(), indent=2, sort_keys=True).encode() + b"\n"
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_request_bytes)
        app.router.add_post("/v1/recommend", self.recommend)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def start(self, host: str, port: int, *, grace_s: float = 5.0, reuse_port: bool = False) -> int:
        """Bind ``host:port`` (0 = any free port; ``::`` for every IPv6 and IPv4 address;
        ``reuse_port``: shared with the other frontend workers); returns the bound port. A client
        that disconnects cancels its request (as gRPC does)."""
        ssl_context = None
        if self._tls is not None:
            ssl_context = self._tls.ssl_context(server=True)
            self._reload_task = asyncio.get_running_loop().create_task(self._reload(ssl_context))
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=grace_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Refuse new connections, let in-flight requests finish within the grace period."""
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _reload(self, ctx: ssl.SSLContext) -> None:
        """Load rotated certificate files into the served context (new handshakes use them)."""
        assert self._tls is not None
        seen = self._tls.generation
        while True:
            await asyncio.sleep(self._tls.config.poll_s)  # the rotation poll
            if self._tls.generation != seen:
                seen = self._tls.generation
                self._tls.load(ctx)

    def _caller(self, headers: Mapping[str, str]) -> str:
        caller = self._access.admit(Access.PUBLIC, bearer(headers.get("Authorization")))
        return caller if caller is not None else caller_of((k.lower(), v) for k, v in headers.items())

    async def recommend(self, request: web.Request) -> web.Response:
        try:
            caller = self._caller(request.headers)
            timeout_s = timeout_of(request.headers)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                too_big = ResourceExhaustedError(f"request body is over this frontend's cap of {self._max_request_bytes} bytes")
                return _error(too_big, http=413)
            parent = extract([(k.lower(), v) for k, v in request.headers.items()])  # a W3C traceparent header
            rec = await self._recommender.recommend(parse_json_request(body), timeout_s=timeout_s, caller=caller, parent=parent)
        except Exception as e:  # noqa: BLE001 - the edge: every failure becomes an HTTP error
            return _error(e)
        body = json_format.MessageToJson(to_response(rec), always_print_fields_with_no_presence=True, indent=None)
        return web.Response(body=body.encode(), content_type="application/json")

    async def healthz(self, _request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        ready = self._ready()
        return _json(200 if ready else 503, {"status": "SERVING" if ready else "NOT_SERVING"})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")
