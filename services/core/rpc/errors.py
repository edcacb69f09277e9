"""Errors become gRPC statuses here, at the edge, and nowhere else.

``handle_errors`` wraps a servicer method (sync or asyncio): a ShardrecError aborts with its
declared code and message (and a google.rpc ``RetryInfo`` when it names a retry delay);
anything else is logged with its traceback under a fresh incident id and answered INTERNAL
"internal error, id X": no exception text reaches the caller, and a bug in one request never
takes the server down.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc

from services.core.errors import ShardrecError

log = logging.getLogger(__name__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message a caller sees for ``exc`` (an unexpected one is logged here)."""
    if isinstance(exc, ShardrecError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, id %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error, id {incident}"


def trailing_metadata(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple:
    """The ``grpc-status-details-bin`` trailer (google.rpc.Status with RetryInfo) for ``exc``,
    or () when it has no details."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(0, int(retry_after_s * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call (caller side), or None when it carries none."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in () if status is None else status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def handle_errors(method):
    """Decorate a servicer method ``(self, request, context)`` to map exceptions to statuses."""

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self, request, context):
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001 - the edge: every failure becomes a status
                code, msg = status_of(e)
                await context.abort(code, msg, trailing_metadata(e, code, msg))

        return async_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - the edge: every failure becomes a status
            if not isinstance(e, ShardrecError) and context.code() is not None:
                raise  # already aborted by the handler itself
            code, msg = status_of(e)
            md = trailing_metadata(e, code, msg)
            if md:
                context.set_trailing_metadata(md)
            context.abort(code, msg)

    return wrapper
