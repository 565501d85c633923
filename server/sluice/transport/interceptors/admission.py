"""Admission: in-flight limits on inference work, shed at once (never queued).

Only calls that run a model are admitted: probes and metadata calls (ServerLive, ModelReady,
ModelMetadata, ...) must answer truthfully under overload and while draining. Streams are
admitted per request they carry, by the stream servicer, with the same controller; here
every stream is held open with ``AdmissionController.stream``, so that a drain refuses new
ones and waits for the open ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.admission import AdmissionController
from sluice.tracing import Tracing
from sluice.transport.interceptors._wrap import CallInfo, Interceptor

# Streams (ModelStreamInfer, GenerateStream) admit each request they carry themselves.
_ADMITTED_METHODS = frozenset({"ModelInfer", "Generate"})


class AdmissionInterceptor(Interceptor):
    def __init__(
        self, controller: AdmissionController, *, tenant_key: str, tracing: Tracing | None = None
    ) -> None:
        self._controller = controller
        self._tenant_key = tenant_key
        self._tracing = tracing or Tracing.off()

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if call.streaming:
            with self._controller.stream():
                yield
            return
        if call.request is None or call.short_method not in _ADMITTED_METHODS:
            yield
            return
        with self._tracing.span("sluice.admission", leaf=True):
            ticket = self._controller.admit(call.metadata(self._tenant_key))
        try:
            yield
        finally:
            ticket.release()
