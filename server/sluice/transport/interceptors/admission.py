"""Admission: in-flight limits, shed at once (never queued behind the limit).

Streams are admitted per request they carry, by the stream servicer, with the same
controller; health and reflection are never shed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.admission import AdmissionController
from sluice.transport.interceptors._wrap import CallInfo, Interceptor


class AdmissionInterceptor(Interceptor):
    def __init__(self, controller: AdmissionController, *, tenant_key: str) -> None:
        self._controller = controller
        self._tenant_key = tenant_key

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if call.request is None:
            yield
            return
        ticket = self._controller.admit(call.metadata.get(self._tenant_key, ""))
        try:
            yield
        finally:
            ticket.release()
