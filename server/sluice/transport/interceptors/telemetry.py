"""Telemetry: a request id for every call, and call counts and latency by method, model
and status code."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.batching.dynamic import Clock
from sluice.metrics import Metrics
from sluice.service import InferenceService
from sluice.transport import callctx
from sluice.transport.interceptors._wrap import CallInfo, Interceptor


def _code_name(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default


class TelemetryInterceptor(Interceptor):
    include_operational = True

    def __init__(self, metrics: Metrics, service: InferenceService, *, clock: Clock) -> None:
        self._metrics = metrics
        # Request ids: unique per process start, then a counter (cheaper than a uuid per call).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._service = service
        self._clock = clock

    def _model_label(self, call: CallInfo) -> str:
        name = getattr(call.request, "model_name", "") or getattr(call.request, "name", "")
        # Only known models become label values: callers must not grow the label set.
        return name if self._service.has_model(name) else ""

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        rid = call.metadata(callctx.REQUEST_ID_KEY) or f"{self._id_prefix}-{next(self._ids):x}"
        token = callctx.request_id.set(rid)
        context.set_trailing_metadata(((callctx.REQUEST_ID_KEY, rid),))
        started = self._clock()
        code = "UNKNOWN"
        try:
            yield
            code = _code_name(context, "OK")
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context, "UNKNOWN")
            raise
        finally:
            method, model = call.short_method, self._model_label(call)
            self._metrics.requests.labels(method, model, code).inc()
            self._metrics.request_seconds.labels(method, model).observe(self._clock() - started)
            callctx.request_id.reset(token)
