"""Per-call values that interceptors set and servicers read (task-local context)."""

from __future__ import annotations

from contextvars import ContextVar

#: The call's request id (echoed in trailing metadata and in every error message).
request_id: ContextVar[str] = ContextVar("sluice_request_id", default="")
#: The call's absolute deadline on the service clock, or None for streams.
deadline: ContextVar[float | None] = ContextVar("sluice_deadline", default=None)

REQUEST_ID_KEY = "x-request-id"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
