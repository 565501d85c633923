"""Telemetry: a request id for every call (in the trailers), its server span (honouring an
incoming ``traceparent``; health and reflection calls are not traced), and call counts and
latency by method, model and status code."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from sluice import callctx
from sluice.clock import Clock
from sluice.metrics import Metrics
from sluice.registry import ModelTable
from sluice.tracing import UNTRACED, Tracing
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.limits import valid_request_id

Context = grpc.aio.ServicerContext[Any, Any]


def _code_name(context: Context, default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default


def _finish_span(span: Span, code: str, model: str) -> None:
    if model:  # known once the request is decoded, inside the hooks
        span.set_attribute("sluice.model", model)
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))


class TelemetryInterceptor(Interceptor):
    include_operational = True

    def __init__(
        self,
        metrics: Metrics,
        models: ModelTable,
        *,
        clock: Clock,
        tracing: Tracing | None = None,
    ) -> None:
        self._metrics = metrics
        # Request ids: unique per process start, then a counter (cheaper than a uuid per call).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._models = models
        self._clock = clock
        self._tracing = tracing or Tracing.off()
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def _count(self, method: str, model: str, code: str, seconds: float) -> None:
        """The call in the RPC metrics, through label children bound once per label set
        (bounded: methods of the RPC table, loaded models or "", status code names)."""
        children = self._children.get((method, model, code))
        if children is None:
            children = self._children[method, model, code] = (
                self._metrics.requests.labels(method, model, code),
                self._metrics.request_seconds.labels(method, model),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def _model_label(self, call: CallInfo) -> str:
        name = getattr(call.request, "model_name", "") or getattr(call.request, "name", "")
        # Only known models become label values: callers must not grow the label set.
        return name if self._models.has_model(name) else ""

    def _server_span(
        self, call: CallInfo, context: Context, rid: str
    ) -> contextlib.AbstractContextManager[Span]:
        if not self._tracing.enabled or not call.rpc.traced:
            return UNTRACED
        return self._tracing.server_span(
            call.method, call.invocation_metadata(), {"sluice.request_id": rid}
        )

    @contextlib.asynccontextmanager
    async def around(self, call: CallInfo, context: Context) -> AsyncIterator[None]:
        given = call.metadata(callctx.REQUEST_ID_KEY)
        rid = given if given and valid_request_id(given) else self._new_id()
        token = callctx.request_id.set(rid)
        context.set_trailing_metadata(((callctx.REQUEST_ID_KEY, rid),))
        started = self._clock()
        code = "UNKNOWN"
        try:
            with self._server_span(call, context, rid) as span:
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
                    if span.is_recording():
                        _finish_span(span, code, self._model_label(call))
        finally:
            self._count(call.short_method, self._model_label(call), code, self._clock() - started)
            callctx.request_id.reset(token)
