"""Per-call values that interceptors set and servicers read (task-local context)."""

from __future__ import annotations

from contextvars import ContextVar

from sluice_client.names import PUSHBACK_KEY, REQUEST_ID_KEY

__all__ = ["LOCAL_CALLER", "PUSHBACK_KEY", "REQUEST_ID_KEY", "caller", "deadline", "request_id"]

#: The call's request id (echoed in trailing metadata and in every error message).
request_id: ContextVar[str] = ContextVar("sluice_request_id", default="")
#: The call's absolute deadline on the service clock, or None for streams.
deadline: ContextVar[float | None] = ContextVar("sluice_deadline", default=None)
#: Who makes an admin call (the admin token's name, the client certificate's identity, or
#: LOCAL_CALLER), for the history of what it changes; never the peer's address.
caller: ContextVar[str] = ContextVar("sluice_caller", default="")
#: The caller of admin calls served without a credential on a loopback-only server.
LOCAL_CALLER = "local"
