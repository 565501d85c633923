"""Deadlines: a default budget when the client sent none, a cap, early rejection of calls
that arrive already expired (counted as ``rejected{reason="deadline"}``), and the budget
handed to the core through ``callctx``, all through the ``CallPolicy``.

Client-streaming calls (ModelStreamInfer, GenerateStream) carry many requests: each one
gets its own budget where it is read, so the stream itself gets none here.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from sluice import callctx
from sluice.deadlines import Expiry
from sluice.errors import DeadlineExceededError
from sluice.metrics import Metrics
from sluice.policy import CallPolicy
from sluice.tracing import annotate
from sluice.transport import convert
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice_api.inference import grpc_service_pb2 as pb


def _timeout_parameter_s(request: Any) -> float | None:
    if isinstance(request, pb.ModelInferRequest):
        return convert.timeout_parameter_s(request)
    return None


class DeadlineInterceptor(Interceptor):
    def __init__(self, policy: CallPolicy, metrics: Metrics) -> None:
        self._policy = policy
        self._metrics = metrics

    def around(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Budgeted:
        return Budgeted(self, call, context)

    def _reject_spent_stream(self, remaining: float | None) -> None:
        if remaining is not None and remaining <= 0:
            self._metrics.rejected.labels("deadline").inc()
            raise DeadlineExceededError("the stream's deadline had already passed")


class Budgeted:
    """One call held to its budget: the deadline in ``callctx`` and a timeout scope. (A
    plain class rather than a generator-based context manager: every call enters one.)"""

    __slots__ = ("_call", "_context", "_owner", "_scope", "_token")

    def __init__(
        self,
        owner: DeadlineInterceptor,
        call: CallInfo,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self._owner = owner
        self._call = call
        self._context = context
        self._scope: Expiry | None = None

    async def __aenter__(self) -> None:
        remaining = self._context.time_remaining()
        request, policy = self._call.request, self._owner._policy
        if request is None:
            self._owner._reject_spent_stream(remaining)
            return
        budget = policy.budget_s(remaining, _timeout_parameter_s(request))
        annotate("sluice.budget_s", budget)
        self._token = callctx.deadline.set(policy.deadline(budget))
        scope = policy.within(budget, "the call")
        try:
            await scope.__aenter__()
        except BaseException:
            callctx.deadline.reset(self._token)
            raise
        self._scope = scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._scope is None:
            return
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        finally:
            callctx.deadline.reset(self._token)
