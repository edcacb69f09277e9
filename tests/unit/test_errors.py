"""Retryability is decided once, in ``services.core.errors``: a table of the statuses of a
remote call another replica may fix, and each error class's ``retryable``."""

import grpc

from services.core import errors


def test_retryable_statuses_are_grpc_codes():
    names = {c.name for c in grpc.StatusCode}
    assert errors.RETRYABLE_STATUSES <= names


def test_a_remote_timeout_is_retried_but_the_requests_own_deadline_is_final():
    assert errors.retryable_status("DEADLINE_EXCEEDED")  # the call's own timeout: another replica
    assert not errors.DeadlineExceededError.retryable  # the request's budget is spent
    assert errors.DeadlineExceededError.grpc_code == "DEADLINE_EXCEEDED"


def test_what_another_replica_cannot_fix():
    for name in ("INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        assert not errors.retryable_status(name), name
    assert not errors.InvalidArgumentError.retryable


def test_every_retryable_error_class_has_a_retryable_status():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ShardrecError)]
    for c in classes:
        if c.retryable:
            assert errors.retryable_status(c.grpc_code), c
