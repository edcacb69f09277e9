"""One exception tree. Each class names its gRPC status code and whether a retry may help;
``RETRYABLE_STATUSES`` says which statuses of a remote call another replica may fix. Retryability
is decided here and nowhere else.

Pure module: codes are ``grpc.StatusCode`` *names*; ``services.core.rpc`` turns errors into
statuses at the edge, in one place.
"""

from __future__ import annotations

# Statuses of a shard call after which another replica may succeed (the fan-out retries the
# call elsewhere while the request has budget left). DEADLINE_EXCEEDED is here on purpose: a
# Lookup that hit its own per-call timeout (a stalled or overloaded node) while the request still
# has budget is retried on another replica. The request's own deadline is final:
# ``DeadlineExceededError`` (raised when the request's budget is spent) is not retryable.
RETRYABLE_STATUSES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "CANCELLED", "UNKNOWN"}
)


def retryable_status(code_name: str) -> bool:
    """Whether another replica may answer a call that failed with status ``code_name`` (a
    ``grpc.StatusCode`` name, e.g. ``"UNAVAILABLE"``); see ``RETRYABLE_STATUSES``."""
    return code_name in RETRYABLE_STATUSES


class ShardrecError(Exception):
    """Base of every error shardrec raises on purpose.

    ``retry_after_s``: when set, the status carries a google.rpc ``RetryInfo`` with that delay
    (how long a caller should back off before trying again). ``field``: when set, the request
    field at fault (e.g. ``candidate_item_ids[3]``), carried as a google.rpc ``BadRequest``
    field violation."""

    grpc_code: str = "INTERNAL"
    retryable: bool = False

    def __init__(self, *args: object, retry_after_s: float | None = None, field: str | None = None) -> None:
        super().__init__(*args)
        self.retry_after_s = retry_after_s
        self.field = field


class InvalidArgumentError(ShardrecError):
    """The caller sent something malformed; the message names the field and value."""

    grpc_code = "INVALID_ARGUMENT"


class UnauthenticatedError(ShardrecError):
    """No credentials, or credentials this server does not know (a missing or unknown token)."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(ShardrecError):
    """Known credentials that may not call this method (a caller token on an admin RPC, a
    client certificate that is not a frontend's on Lookup)."""

    grpc_code = "PERMISSION_DENIED"


class ResourceExhaustedError(ShardrecError):
    """A request or queue is over a configured cap."""

    grpc_code = "RESOURCE_EXHAUSTED"
    retryable = True


class FailedPreconditionError(ShardrecError):
    """This node does not hold the partition, version or map version asked for; re-route."""

    grpc_code = "FAILED_PRECONDITION"
    retryable = True


class UnavailableError(ShardrecError):
    """No live replica, or the service is not ready."""

    grpc_code = "UNAVAILABLE"
    retryable = True


class DeadlineExceededError(ShardrecError):
    """The request's own deadline passed: final, never retried (unlike a remote call's
    DEADLINE_EXCEEDED status, see ``RETRYABLE_STATUSES``)."""

    grpc_code = "DEADLINE_EXCEEDED"


class NotFoundError(ShardrecError):
    grpc_code = "NOT_FOUND"


class CheckpointError(ShardrecError):
    """A checkpoint is missing, partial, corrupt or inconsistent; it is refused as a whole."""

    grpc_code = "FAILED_PRECONDITION"


class ConfigError(ShardrecError):
    """A configuration or spec file is invalid."""

    grpc_code = "INVALID_ARGUMENT"


class PlanError(ConfigError):
    """No placement satisfies the planner's inputs: the tables do not fit the nodes' memory, or a
    pin asks for more than the cluster has. The message names the table and what is short; a
    retry does not help until nodes, memory, pins or tables change."""
