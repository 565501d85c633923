"""Breaker check: fail fast with UNAVAILABLE when every candidate that could serve the call
(the model and its fallbacks) has an open breaker, before anything is queued. (Breakers
themselves count at the executor call.) Refusals count as ``rejected{reason="breaker"}``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.errors import BreakerOpenError
from sluice.metrics import Metrics
from sluice.routing import Router
from sluice.transport.interceptors._wrap import CallInfo, Interceptor

# ModelInferRequest and GenerateRequest both name the model this way.
_INFERENCE_METHODS = frozenset({"ModelInfer", "Generate"})


class BreakerInterceptor(Interceptor):
    def __init__(self, router: Router, metrics: Metrics) -> None:
        self._router = router
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if call.request is not None and call.short_method in _INFERENCE_METHODS:
            try:
                self._router.fail_fast(call.request.model_name, call.request.model_version)
            except BreakerOpenError:
                self._metrics.rejected.labels("breaker").inc()
                raise
        yield
