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
from contextlib import AbstractContextManager
from types import TracebackType
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

    def around(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Admitted:
        return Admitted(self, call, context)

    def _admit(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Held:
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

    def _enter(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Held | AbstractContextManager[None] | None:
        """What the call holds inside the cutoff: an admission, or an open stream."""
        if call.rpc.admitted:
            return self._admit(call, context)
        if call.request is None:  # request streams admit each request they carry
            stream = self._controller.stream()
            stream.__enter__()
            return stream
        return None


Held = tuple[Ticket, contextvars.Token[Ticket | None], contextvars.Token[int]]


class Admitted:
    """One call inside the drain's cutoff, holding its admission (or its stream open).
    (A plain class rather than a generator-based context manager: every call enters one.)"""

    __slots__ = ("_call", "_context", "_cutoff", "_held", "_owner")

    def __init__(
        self,
        owner: AdmissionInterceptor,
        call: CallInfo,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self._owner = owner
        self._call = call
        self._context = context
        self._held: Held | AbstractContextManager[None] | None = None

    async def __aenter__(self) -> None:
        self._cutoff = cutoff = self._owner._controller.cutoff()
        await cutoff.__aenter__()
        try:
            self._held = self._owner._enter(self._call, self._context)
        except BaseException as exc:
            await cutoff.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if isinstance(self._held, tuple):
                ticket, token, level = self._held
                ticket.release()
                with contextlib.suppress(ValueError):  # ended in another context
                    callctx.ticket.reset(token)
                with contextlib.suppress(ValueError):
                    callctx.priority.reset(level)
            elif self._held is not None:
                self._held.__exit__(exc_type, exc, tb)
        finally:
            await self._cutoff.__aexit__(exc_type, exc, tb)
