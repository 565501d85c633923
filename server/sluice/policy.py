"""The rules an inference request passes before it runs, in one place: its deadline budget
(a default, a cap, refused when already spent), admission (in flight, bytes, tenant
quotas), a breaker check (fail fast when no candidate could take it), and the timeout that
holds it to its budget.

The interceptors apply them to unary calls, one concern each (``deadline``, ``admission``,
``breaker``); the stream sessions apply them, in the same order, to every request a stream
carries (``admit_request``). Either way a refusal is counted in
``sluice_rejected_requests_total`` and an admission gets its ``sluice.admission`` span.
What the drain does with calls and open streams stays with ``AdmissionController``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sluice.admission import AdmissionController, Ticket
from sluice.deadlines import DeadlinePolicy, Expiry
from sluice.domain import Call
from sluice.errors import BreakerOpenError, DeadlineExceededError
from sluice.metrics import Metrics
from sluice.priority import Priorities
from sluice.routing import Router
from sluice.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Admitted:
    """One request a stream carries, admitted: its budget, and the call the core gets."""

    budget_s: float
    call: Call
    ticket: Ticket


class CallPolicy:
    def __init__(
        self,
        *,
        tenant_key: str,
        deadlines: DeadlinePolicy,
        admission: AdmissionController,
        router: Router,
        metrics: Metrics,
        tracing: Tracing | None = None,
        priorities: Priorities | None = None,
    ) -> None:
        self._tenant_key = tenant_key
        self._priorities = priorities or Priorities()
        self._deadlines = deadlines
        self._admission = admission
        self._router = router
        self._metrics = metrics
        self._tracing = tracing or Tracing.off()

    def tenant(self, metadata: Iterable[tuple[str, Any]]) -> str:
        """The tenant a call's metadata names (``admission.tenant_metadata_key``), or ""."""
        for key, value in metadata:
            if key == self._tenant_key and isinstance(value, str):
                return value
        return ""

    def priority(self, metadata: Iterable[tuple[str, Any]], parameter: int | None = None) -> int:
        """The request's priority level: its ``priority`` parameter (not 0), else the level
        or class its metadata names (``priority.metadata_key``), else the default level;
        a bad value is ``InvalidInputError`` naming the valid ones."""
        named = ""
        for key, value in metadata:
            if key == self._priorities.metadata_key and isinstance(value, str):
                named = value
                break
        return self._priorities.resolve(parameter=parameter, metadata=named)

    def budget_s(self, remaining_s: float | None, timeout_s: float | None = None) -> float:
        """Seconds the request may take: the tightest of the client's deadline, its
        ``timeout`` and the cap; ``DeadlineExceededError`` when none is left."""
        try:
            return self._deadlines.budget_s(remaining_s, timeout_s)
        except DeadlineExceededError:
            self._metrics.rejected.labels("deadline").inc()
            raise

    def deadline(self, budget_s: float) -> float:
        """The absolute deadline, on the service clock, of a budget starting now."""
        return self._deadlines.deadline(budget_s)

    def admit(
        self, tenant: str, *, request_bytes: int, priority: int = 0, in_stream: bool = False
    ) -> Ticket:
        """Admit one request of ``request_bytes`` at ``priority`` or raise (release the
        ticket when done). ``in_stream``: read by an open stream, which stops reading once
        the drain begins; what it read before is answered, not refused."""
        with self._tracing.span("sluice.admission", leaf=True):
            return self._admission.admit(
                tenant, request_bytes=request_bytes, priority=priority, read_before_drain=in_stream
            )

    def check_breakers(self, model: str, version: str) -> None:
        """Fail fast when no candidate for the model could take the request now."""
        try:
            self._router.fail_fast(model, version)
        except BreakerOpenError:
            self._metrics.rejected.labels("breaker").inc()
            raise

    def within(self, budget_s: float, what: str) -> Expiry:
        """Hold the work inside to ``budget_s``; past it, ``DeadlineExceededError``."""

        def ran_out() -> DeadlineExceededError:
            return DeadlineExceededError(f"{what} ran out of its {budget_s:.3f}s budget")

        when = asyncio.get_running_loop().time() + budget_s
        return Expiry(when, ran_out, any_timeout=True)

    def admit_request(
        self,
        *,
        tenant: str,
        request_bytes: int,
        remaining_s: float | None,
        timeout_s: float | None = None,
        model: str,
        version: str,
        priority: int = 0,
    ) -> Admitted:
        """One request of a stream, through the same rules as a unary call, in the same
        order: budget, admission, the breaker check of the model it names. The caller
        releases the ticket once the request's answer is written."""
        budget_s = self.budget_s(remaining_s, timeout_s)
        deadline = self.deadline(budget_s)
        ticket = self.admit(tenant, request_bytes=request_bytes, priority=priority, in_stream=True)
        try:
            self.check_breakers(model, version)
        except BaseException:
            ticket.release()
            raise
        return Admitted(budget_s, Call(deadline=deadline, ticket=ticket, priority=priority), ticket)
