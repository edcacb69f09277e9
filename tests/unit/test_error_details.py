"""Error details at the edge: BadRequest field violations and RetryInfo in the gRPC status, and
the same status over HTTP (the code of each gRPC status, Google's JSON body, Retry-After)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from services.core import errors
from services.core.rpc.errors import HTTP_STATUS, http_error, status_of, status_proto


def _unpack(status, cls):
    out = []
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            m = cls()
            d.Unpack(m)
            out.append(m)
    return out


def test_invalid_argument_with_a_field_carries_a_bad_request():
    e = errors.InvalidArgumentError("top_k = 0 must be between 1 and 3", field="top_k")
    code, msg = status_of(e)
    (bad,) = _unpack(status_proto(e, code, msg), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("top_k", msg)]
    assert not _unpack(status_proto(errors.InvalidArgumentError("x"), code, "x"), error_details_pb2.BadRequest)


@pytest.mark.parametrize(
    "exc, http",
    [
        (errors.InvalidArgumentError("bad", field="top_k"), 400),
        (errors.UnauthenticatedError("no token"), 401),
        (errors.PermissionDeniedError("admin only"), 403),
        (errors.NotFoundError("none"), 404),
        (errors.ResourceExhaustedError("shed; retry in 50 ms", retry_after_s=0.05), 429),
        (errors.FailedPreconditionError("moved"), 400),
        (errors.UnavailableError("no live replica"), 503),
        (errors.DeadlineExceededError("late"), 504),
        (RuntimeError("a bug"), 500),
    ],
)
def test_http_error_maps_the_grpc_status(exc, http):
    code, body, headers = http_error(exc)
    assert code == http == body["error"]["code"]
    assert body["error"]["status"] == status_of(exc)[0].name
    if isinstance(exc, errors.ResourceExhaustedError):
        assert headers == {"Retry-After": "1"}
        assert body["error"]["details"] == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.050s"}]
    elif isinstance(exc, RuntimeError):
        assert "a bug" not in body["error"]["message"] and body["error"]["message"].startswith("internal error, id ")
    if getattr(exc, "field", None):
        assert body["error"]["details"][0]["fieldViolations"][0]["field"] == "top_k"


def test_every_grpc_status_has_an_http_code():
    assert set(HTTP_STATUS) == {c.name for c in grpc.StatusCode}
