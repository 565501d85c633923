"""Admission: in-flight limits on inference work, shed at once (never queued).

Only calls that run a model (or its tokenizer: ``Rpc.admitted``) are admitted here, weighed
by their request's size at their priority level (its ``priority`` parameter or metadata,
handed to the core through ``callctx``), through the ``CallPolicy``; the core adds the
reply's size and the generation's tokens to the call's ticket (``callctx.ticket``) before
the work starts.
Probes and metadata calls (ServerLive, ModelReady, ModelMetadata, ...) must answer
truthfully under overload and while draining. Request streams admit each request they carry
(the stream sessions, through the same policy); here every stream is held open with
``AdmissionController.stream``, so that a drain refuses new ones and waits for the open
ones. Every call (admitted or not) runs inside ``AdmissionController.cutoff``: one still
running when a drain's grace ends is stopped with UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import callctx
from sluice.admission import AdmissionController, Ticket
from sluice.policy import CallPolicy
from sluice.transport import convert
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice_api.inference import grpc_service_pb2 as pb


class AdmissionInterceptor(Interceptor):
    def __init__(self, controller: AdmissionController, policy: CallPolicy) -> None:
        self._controller = controller
        self._policy = policy

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        async with self._controller.cutoff():
            if call.rpc.admitted:
                ticket, token, level = self._admit(call, context)
                try:
                    yield
                finally:
                    ticket.release()
                    with contextlib.suppress(ValueError):  # ended in another context
                        callctx.ticket.reset(token)
                    with contextlib.suppress(ValueError):
                        callctx.priority.reset(level)
            elif call.request is None:  # request streams admit each request they carry
                with self._controller.stream():
                    yield
            else:
                yield

    def _admit(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Ticket, contextvars.Token[Ticket | None], contextvars.Token[int]]:
        """Admit the call (or raise): its ticket, handed to the core through ``callctx``
        with its priority level."""
        metadata = call.invocation_metadata()
        tenant = self._policy.tenant(metadata)
        parameter = (
            convert.priority_parameter(call.request)
            if isinstance(call.request, pb.ModelInferRequest)
            else None
        )
        priority = self._policy.priority(metadata, parameter)
        ticket = self._policy.admit(tenant, request_bytes=call.size, priority=priority)
        return ticket, callctx.ticket.set(ticket), callctx.priority.set(priority)
