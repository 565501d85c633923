"""Deadlines: a default budget when the client sent none, a cap, early rejection of calls
that arrive already expired (counted as ``rejected{reason="deadline"}``), and the budget
handed to the core through ``callctx``, all through the ``CallPolicy``.

Client-streaming calls (ModelStreamInfer, GenerateStream) carry many requests: each one
gets its own budget where it is read, so the stream itself gets none here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import callctx
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

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        remaining = context.time_remaining()
        if call.request is None:
            if remaining is not None and remaining <= 0:
                self._metrics.rejected.labels("deadline").inc()
                raise DeadlineExceededError("the stream's deadline had already passed")
            yield
            return
        budget = self._policy.budget_s(remaining, _timeout_parameter_s(call.request))
        annotate("sluice.budget_s", budget)
        token = callctx.deadline.set(self._policy.deadline(budget))
        try:
            async with self._policy.within(budget, "the call"):
                yield
        finally:
            callctx.deadline.reset(token)
