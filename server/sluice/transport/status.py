"""The one table from Sluice's exception tree to gRPC status codes, and the trailers
(request id, pushback, rich error details) that go with an error."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from sluice import errors
from sluice.transport.callctx import PUSHBACK_KEY, REQUEST_ID_KEY

STATUS_BY_ERROR: dict[type[errors.SluiceError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.RequestCancelledError: grpc.StatusCode.CANCELLED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: errors.SluiceError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def message_for(exc: errors.SluiceError, request_id: str) -> str:
    return f"{exc.message} (request id {request_id})" if request_id else exc.message


def trailers_for(exc: errors.SluiceError, request_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """Request id, ``grpc-retry-pushback-ms`` and google.rpc details where they apply."""
    trailers: list[tuple[str, str | bytes]] = []
    if request_id:
        trailers.append((REQUEST_ID_KEY, request_id))
    if exc.retry_after_ms is None:
        return tuple(trailers)
    if exc.transient:
        trailers.append((PUSHBACK_KEY, str(exc.retry_after_ms)))
    code = status_for(exc)
    detail = status_pb2.Status(code=code.value[0], message=exc.message)
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(
            nanos=(exc.retry_after_ms % 1000) * 1_000_000, seconds=exc.retry_after_ms // 1000
        )
    )
    detail.details.add().Pack(retry)
    if isinstance(exc, errors.QuotaExceededError):
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=exc.subject, description=exc.message
                )
            ]
        )
        detail.details.add().Pack(quota)
    trailers.append(("grpc-status-details-bin", detail.SerializeToString()))
    return tuple(trailers)
