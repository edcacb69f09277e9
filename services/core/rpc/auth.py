"""Authentication and authorization of every gRPC call, in one server interceptor per server
(docs/security.md): ``ACCESS`` says what each method needs, ``services.core.auth.AccessPolicy``
decides. A refused call is UNAUTHENTICATED or PERMISSION_DENIED before the servicer runs.

Installed by ``services.core.rpc.server`` only when the policy checks something, so a server
without authentication pays nothing. The caller identity of an admitted call (a token's
``caller``) is in ``current_caller()`` while its handler runs (a context variable: the call's
task on grpc.aio, its thread on a sync server).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable

import grpc

from services.core.auth import Access, AccessPolicy, bearer
from services.core.errors import ShardrecError
from services.core.rpc.errors import status_of

ACCESS: dict[str, Access] = {
    "/shardrec.v1.Recommender/Recommend": Access.PUBLIC,
    "/shardrec.v1.EmbeddingShard/Lookup": Access.INTERNAL,
    "/shardrec.v1.EmbeddingShard/Describe": Access.ADMIN,
    "/shardrec.v1.FrontendAdmin/GetStats": Access.ADMIN,
    "/grpc.health.v1.Health/Check": Access.OPEN,
    "/grpc.health.v1.Health/Watch": Access.OPEN,
}
# Anything else (reflection, a method added later) needs an admin token.
DEFAULT_ACCESS = Access.ADMIN

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardrec_caller", default=None)
_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def current_caller() -> str | None:
    """The authenticated caller of the call being handled, or None (authentication off)."""
    return _CALLER.get()


def peer_names(context) -> list[str]:  # noqa: ANN001 - a grpc servicer context
    """The common names of the client certificate of a call (empty without mTLS)."""
    return [n.decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]


def _token(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer(value)
    return None


def _replace_behavior(handler, wrap: Callable[[Callable], Callable]):  # noqa: ANN001, ANN202 - a grpc RpcMethodHandler
    for name in _BEHAVIORS:
        behavior = getattr(handler, name)
        if behavior is not None:
            return handler._replace(**{name: wrap(behavior)})
    return handler


def _deny(handler, exc: ShardrecError):  # noqa: ANN001, ANN202
    code, message = status_of(exc)

    def wrap(behavior: Callable) -> Callable:
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):

            async def deny_async(request, context):
                await context.abort(code, message)

            return deny_async

        def deny(request, context):
            context.abort(code, message)

        return deny

    return _replace_behavior(handler, wrap)


def _admitted(handler, policy: AccessPolicy, access: Access, identity: str | None, token: str | None):  # noqa: ANN001, ANN202
    """The handler with the peer check (mTLS Lookup) and the caller identity around it."""
    check_peer = access is Access.INTERNAL and policy.mtls
    if not check_peer and identity is None:
        return handler

    def wrap(behavior: Callable) -> Callable:
        if not (handler.unary_unary is behavior):
            return behavior  # streaming methods are token-checked only (reflection)

        def admit(context) -> str | None:  # noqa: ANN001
            return policy.admit(access, token, peer_names(context)) if check_peer else identity

        if inspect.iscoroutinefunction(behavior):

            @functools.wraps(behavior)
            async def run_async(request, context):
                try:
                    who = admit(context)
                except ShardrecError as e:
                    await context.abort(*status_of(e))
                reset = _CALLER.set(who)
                try:
                    return await behavior(request, context)
                finally:
                    _CALLER.reset(reset)

            return run_async

        @functools.wraps(behavior)
        def run(request, context):
            try:
                who = admit(context)
            except ShardrecError as e:
                context.abort(*status_of(e))
            reset = _CALLER.set(who)
            try:
                return behavior(request, context)
            finally:
                _CALLER.reset(reset)

        return run

    return _replace_behavior(handler, wrap)


def _intercept(policy: AccessPolicy, handler, details: grpc.HandlerCallDetails):  # noqa: ANN001, ANN202
    if handler is None:
        return None
    access = ACCESS.get(details.method, DEFAULT_ACCESS)
    token = _token(details)
    if access is Access.INTERNAL and policy.mtls:
        return _admitted(handler, policy, access, None, token)  # the certificate is checked per call
    try:
        identity = policy.admit(access, token)
    except ShardrecError as e:
        return _deny(handler, e)
    return _admitted(handler, policy, access, identity, token)


class AuthInterceptor(grpc.ServerInterceptor):
    """For a thread-pool server (the shard)."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        return _intercept(self._policy, continuation(handler_call_details), handler_call_details)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """For a grpc.aio server (the frontend)."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        return _intercept(self._policy, await continuation(handler_call_details), handler_call_details)
