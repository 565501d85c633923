"""Per-call values (task-local context): the transport's interceptors set them, servicers
read them and hand the core a ``Call`` (``call()``), and log records carry the request id.

They live outside ``transport/`` because the layers below read them too (``logs``)."""

from __future__ import annotations

from contextvars import ContextVar

from sluice.admission import Ticket
from sluice.domain import Call
from sluice_client.names import PUSHBACK_KEY, REQUEST_ID_KEY

__all__ = [
    "LOCAL_CALLER",
    "PUSHBACK_KEY",
    "REQUEST_ID_KEY",
    "call",
    "caller",
    "deadline",
    "priority",
    "request_id",
    "ticket",
]

#: The call's request id (echoed in trailing metadata and in every error message).
request_id: ContextVar[str] = ContextVar("sluice_request_id", default="")
#: The call's absolute deadline on the service clock, or None for streams.
deadline: ContextVar[float | None] = ContextVar("sluice_deadline", default=None)
#: Who makes an admin call (the admin token's name, the client certificate's identity, or
#: LOCAL_CALLER), for the history of what it changes; never the peer's address.
caller: ContextVar[str] = ContextVar("sluice_caller", default="")
#: The call's admission ticket (unary inference calls), which the core grows by the reply's
#: size and the generation's tokens before the work starts.
ticket: ContextVar[Ticket | None] = ContextVar("sluice_ticket", default=None)
#: The call's priority level (``sluice.priority``; 0: the default level).
priority: ContextVar[int] = ContextVar("sluice_priority", default=0)
#: The caller of admin calls served without a credential on a loopback-only server.
LOCAL_CALLER = "local"


def call() -> Call:
    """The current call's facts, as the core takes them."""
    return Call(deadline=deadline.get(), ticket=ticket.get(), priority=priority.get())
