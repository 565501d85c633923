"""Admission: in-flight limits on inference work, shed at once (never queued).

Only calls that run a model (or its tokenizer) are admitted, weighed by their request's
size; the core adds the reply's size and the generation's tokens to the call's ticket
(``callctx.ticket``) before the work starts. Probes and metadata calls (ServerLive,
ModelReady, ModelMetadata, ...) must answer truthfully under overload and while draining.
Streams are admitted per request they carry, by the stream servicer, with the same
controller; here every stream is held open with ``AdmissionController.stream``, so that a
drain refuses new ones and waits for the open ones. Every call (admitted or not) runs
inside ``AdmissionController.cutoff``: one still running when a drain's grace ends is
stopped with UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.admission import AdmissionController
from sluice.tracing import Tracing
from sluice.transport import callctx
from sluice.transport.interceptors._wrap import CallInfo, Interceptor

# Streams (ModelStreamInfer, GenerateStream) admit each request they carry themselves.
_ADMITTED_METHODS = frozenset({"ModelInfer", "Generate", "CountTokens"})


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
        async with self._controller.cutoff():
            if call.short_method in _ADMITTED_METHODS:
                async with self._admitted(call):
                    yield
            elif call.request is None:  # request streams admit each request they carry
                with self._controller.stream():
                    yield
            else:
                yield

    @contextlib.asynccontextmanager
    async def _admitted(self, call: CallInfo) -> AsyncIterator[None]:
        with self._tracing.span("sluice.admission", leaf=True):
            ticket = self._controller.admit(
                call.metadata(self._tenant_key), request_bytes=call.size
            )
        token = callctx.ticket.set(ticket)
        try:
            yield
        finally:
            ticket.release()
            with contextlib.suppress(ValueError):  # ended in another context
                callctx.ticket.reset(token)
