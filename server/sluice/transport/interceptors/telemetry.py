"""Telemetry: a request id for every call (in the trailers), its server span (honouring an
incoming ``traceparent``; health and reflection calls are not traced), and call counts and
latency by method, model and status code."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from types import TracebackType
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

    def around(self, call: CallInfo, context: Context) -> Observed:
        return Observed(self, call, context)


class Observed:
    """One call's telemetry: its request id and span as it enters, its status code, span
    end and metrics as it leaves. (A plain class rather than a generator-based context
    manager: every call enters one.)"""

    __slots__ = ("_call", "_context", "_owner", "_scope", "_span", "_started", "_token")

    def __init__(self, owner: TelemetryInterceptor, call: CallInfo, context: Context) -> None:
        self._owner = owner
        self._call = call
        self._context = context

    async def __aenter__(self) -> None:
        owner, call = self._owner, self._call
        given = call.metadata(callctx.REQUEST_ID_KEY)
        rid = given if given and valid_request_id(given) else owner._new_id()
        self._token = callctx.request_id.set(rid)
        self._context.set_trailing_metadata(((callctx.REQUEST_ID_KEY, rid),))
        self._started = owner._clock()
        try:
            self._scope = owner._server_span(call, self._context, rid)
            self._span = self._scope.__enter__()
        except BaseException:
            self._done("UNKNOWN")
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owner, call = self._owner, self._call
        if exc is None:
            code = _code_name(self._context, "OK")
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            code = _code_name(self._context, "UNKNOWN")
        try:
            try:
                if self._span.is_recording():
                    _finish_span(self._span, code, owner._model_label(call))
            finally:
                self._scope.__exit__(exc_type, exc, tb)
        finally:
            self._done(code)

    def _done(self, code: str) -> None:
        owner, call = self._owner, self._call
        seconds = owner._clock() - self._started
        owner._count(call.short_method, owner._model_label(call), code, seconds)
        callctx.request_id.reset(self._token)
