"""Breaker check: fail fast with UNAVAILABLE when the model's backend breaker is open,
before the request is queued. (The breaker itself counts at the executor call.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.service import InferenceService
from sluice.transport.interceptors._wrap import CallInfo, Interceptor

_INFERENCE_METHODS = frozenset({"ModelInfer"})


class BreakerInterceptor(Interceptor):
    def __init__(self, service: InferenceService) -> None:
        super().__init__()
        self._service = service

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if call.request is not None and call.short_method in _INFERENCE_METHODS:
            self._service.ensure_can_serve(call.request.model_name, call.request.model_version)
        yield
