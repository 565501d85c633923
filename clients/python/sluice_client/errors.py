"""The client's exception tree, one class per gRPC status a caller may act on.

    SluiceClientError            any failed call (code, details, request_id, retry_after_ms)
    ├── InvalidArgument          the request is wrong; do not retry it unchanged
    ├── NotFound                 unknown model, version or health service
    ├── FailedPrecondition       a model's configuration or files are invalid
    ├── PermissionDenied         the call needs a credential it lacks
    ├── Unauthenticated          the call carries no valid credential
    ├── ResourceExhausted        a quota is used up, or a message is over the size limit
    ├── DeadlineExceeded         the call's deadline passed
    ├── Cancelled                the call was cancelled
    ├── Unimplemented            the server does not offer this
    ├── Internal                 a server bug; quote ``request_id`` when reporting it
    └── Unavailable              retry later or elsewhere (gRPC already retried it)

Other status codes raise ``SluiceClientError`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

import grpc

from sluice_client.names import PUSHBACK_KEY, REQUEST_ID_KEY


class SluiceClientError(Exception):
    """A call that ended with a non-OK gRPC status."""

    def __init__(
        self,
        *,
        code: grpc.StatusCode,
        details: str,
        request_id: str = "",
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        #: The server's id for the call (``x-request-id`` trailer); "" when none came back.
        self.request_id = request_id
        #: The server's ``grpc-retry-pushback-ms``: wait this long before calling again.
        self.retry_after_ms = retry_after_ms


class InvalidArgument(SluiceClientError):
    pass


class NotFound(SluiceClientError):
    pass


class FailedPrecondition(SluiceClientError):
    pass


class PermissionDenied(SluiceClientError):
    pass


class Unauthenticated(SluiceClientError):
    pass


class ResourceExhausted(SluiceClientError):
    pass


class DeadlineExceeded(SluiceClientError):
    pass


class Cancelled(SluiceClientError):
    pass


class Unimplemented(SluiceClientError):
    pass


class Internal(SluiceClientError):
    pass


class Unavailable(SluiceClientError):
    pass


ERROR_BY_CODE: dict[grpc.StatusCode, type[SluiceClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _pushback_ms(value: str | None) -> int | None:
    """A non-negative pushback in milliseconds; anything else means no retry advice."""
    if value is None or not value.isdigit():
        return None
    return int(value)


class _FailedCall(Protocol):
    """What a failed call's ``grpc.RpcError`` offers at run time, sync and asyncio alike
    (the grpcio stubs type its trailers as objects; they are (key, value) pairs)."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


def from_rpc_error(error: grpc.RpcError) -> SluiceClientError:
    """Translate a ``grpc.RpcError`` (sync or asyncio) into the matching client error."""
    call = cast(_FailedCall, error)
    code = call.code()
    trailers = {
        key: value for key, value in call.trailing_metadata() or () if isinstance(value, str)
    }
    return ERROR_BY_CODE.get(code, SluiceClientError)(
        code=code,
        details=call.details() or "",
        request_id=trailers.get(REQUEST_ID_KEY, ""),
        retry_after_ms=_pushback_ms(trailers.get(PUSHBACK_KEY)),
    )
