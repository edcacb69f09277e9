"""Errors become gRPC statuses here, at the edge, and nowhere else.

``handle_errors`` wraps a servicer method (sync or asyncio): a ShardrecError aborts with its
declared code and message; anything else is logged with its traceback and answered INTERNAL, so
a bug in one request never takes the server down.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from services.core.errors import ShardrecError

log = logging.getLogger(__name__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ShardrecError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def handle_errors(method):
    """Decorate a servicer method ``(self, request, context)`` to map exceptions to statuses."""

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self, request, context):
            try:
                return await method(self, request, context)
            except ShardrecError as e:
                code, msg = status_of(e)
                await context.abort(code, msg)
            except Exception as e:  # noqa: BLE001 - the edge: every failure becomes a status
                if isinstance(e, grpc.aio.AbortError):
                    raise
                log.exception("unhandled error in %s", method.__name__)
                code, msg = status_of(e)
                await context.abort(code, msg)

        return async_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ShardrecError as e:
            code, msg = status_of(e)
            context.abort(code, msg)
        except Exception as e:  # noqa: BLE001 - the edge: every failure becomes a status
            if context.code() is not None:  # already aborted by the handler itself
                raise
            log.exception("unhandled error in %s", method.__name__)
            code, msg = status_of(e)
            context.abort(code, msg)

    return wrapper
