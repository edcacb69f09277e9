"""Errors become gRPC statuses (and HTTP errors) here, at the edge, and nowhere else.

``handle_errors`` wraps a servicer method (sync or asyncio): a ShardrecError aborts with its
declared code and message, with google.rpc details: a ``RetryInfo`` when it names a retry
delay, a ``BadRequest`` field violation when it names the field at fault; anything else is
logged with its traceback under a fresh incident id and answered INTERNAL "internal error, id
X": no exception text reaches the caller, and a bug in one request never takes the server down.
``http_error`` renders the same status for the REST endpoint (docs/http.md): the HTTP code of
the gRPC code, and Google's JSON error body.
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


def status_proto(exc: BaseException, code: grpc.StatusCode, message: str):  # noqa: ANN201 - google.rpc.Status
    """The google.rpc ``Status`` of ``exc``: code, message, and its details (``RetryInfo`` for
    ``retry_after_s``, ``BadRequest`` for ``field``)."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    details = []
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(retry_after_s * 1e9)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    field = getattr(exc, "field", None)
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def trailing_metadata(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple:
    """The ``grpc-status-details-bin`` trailer (google.rpc.Status with RetryInfo and
    BadRequest) for ``exc``, or () when it has no details."""
    status = status_proto(exc, code, message)
    if not status.details:
        return ()
    from grpc_status import rpc_status

    return tuple(rpc_status.to_status(status).trailing_metadata)


# The HTTP code of each gRPC status (Google's API mapping; docs/http.md).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500,
}  # fmt: skip


def http_error(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(HTTP code, JSON body, headers) of ``exc`` for the REST endpoint: the body is Google's
    error model ``{"error": {"code", "message", "status", "details"}}`` with the same details
    as the gRPC status; a retry delay is also ``Retry-After`` (whole seconds, at least 1)."""
    import math

    from google.protobuf import json_format

    code, message = status_of(exc)
    status = status_proto(exc, code, message)
    http = HTTP_STATUS.get(code.name, 500)
    details = [json_format.MessageToDict(d, preserving_proto_field_name=False) for d in status.details]
    body = {"error": {"code": http, "message": message, "status": code.name, "details": details}}
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return http, body, headers


def details_of(error: grpc.RpcError) -> list:
    """The google.rpc details of a failed call (caller side), unpacked (RetryInfo, BadRequest)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    out = []
    for detail in () if status is None else status.details:
        for cls in (error_details_pb2.RetryInfo, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out.append(msg)
    return out


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call (caller side), or None when it carries none."""
    from google.rpc import error_details_pb2

    for info in details_of(error):
        if isinstance(info, error_details_pb2.RetryInfo):
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
