"""ModelStreamInfer: many requests pipelined over one bidirectional stream.

One reader task takes requests off the stream and starts one task per request (at most
``max_pending`` at a time, so a client that does not read cannot make us buffer without
bound). Every request gets the same admission, deadline and breaker rules as a unary call.
Responses go out as they finish, each with the request's ``id``. A failed request becomes a
response with ``error_message`` and the stream stays open, unless the client sent the
``triton_grpc_error: true`` header: then the first error ends the call with its real status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.admission import AdmissionController
from sluice.deadlines import DeadlinePolicy
from sluice.errors import DeadlineExceededError, SluiceError
from sluice.service import InferenceService
from sluice.transport import callctx, convert
from sluice.transport.status import message_for, status_for, trailers_for
from sluice_api.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_END = object()
_TIMEOUT_PARAMETER = "timeout"  # Triton's per-request timeout, in microseconds


class StreamInferSession:
    def __init__(
        self,
        service: InferenceService,
        context: Context,
        *,
        admission: AdmissionController,
        deadlines: DeadlinePolicy,
        max_pending: int,
        tenant_key: str,
    ) -> None:
        self._service = service
        self._context = context
        self._admission = admission
        self._deadlines = deadlines
        self._slots = asyncio.Semaphore(max_pending)
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._grpc_errors = metadata.get("triton_grpc_error", "").lower() == "true"
        self._tenant = metadata.get(tenant_key, "")
        self._out: asyncio.Queue[object] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[pb.ModelInferRequest]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self._out.get()
                if item is _END:
                    break
                if isinstance(item, SluiceError):
                    rid = callctx.request_id.get()
                    await self._context.abort(
                        status_for(item),
                        message_for(item, rid),
                        trailing_metadata=trailers_for(item, rid),
                    )
                assert isinstance(item, pb.ModelStreamInferResponse)
                yield item
        finally:
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        try:
            async for request in requests:
                await self._slots.acquire()
                task = asyncio.create_task(self._serve(request))
                self._tasks.add(task)
                task.add_done_callback(self._done)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            self._out.put_nowait(_END)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, request: pb.ModelInferRequest) -> None:
        try:
            result = await self._infer(request)
        except SluiceError as exc:
            if self._grpc_errors:
                self._out.put_nowait(exc)
                return
            self._out.put_nowait(
                pb.ModelStreamInferResponse(
                    error_message=message_for(exc, callctx.request_id.get()),
                    infer_response=pb.ModelInferResponse(
                        id=request.id,
                        model_name=request.model_name,
                        model_version=request.model_version,
                    ),
                )
            )
            return
        except Exception:
            log.exception("stream request %r failed unexpectedly", request.id)
            self._out.put_nowait(
                pb.ModelStreamInferResponse(
                    error_message=f"internal error; quote request id {callctx.request_id.get()}",
                    infer_response=pb.ModelInferResponse(id=request.id),
                )
            )
            return
        response = convert.infer_response(result)
        response.parameters["triton_final_response"].bool_param = True
        self._out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))

    async def _infer(self, request: pb.ModelInferRequest) -> Any:
        domain = convert.infer_request(request)
        timeout_us = domain.parameters.get(_TIMEOUT_PARAMETER)
        budget = self._deadlines.budget_s(
            self._context.time_remaining(),
            timeout_us / 1e6 if isinstance(timeout_us, int) and timeout_us > 0 else None,
        )
        ticket = self._admission.admit(self._tenant)
        try:
            self._service.ensure_can_serve(domain.model, domain.version)
            async with asyncio.timeout(budget):
                return await self._service.infer(domain, deadline=self._deadlines.deadline(budget))
        except TimeoutError as exc:
            raise DeadlineExceededError(
                f"request '{domain.id}' ran out of its {budget:.3f}s budget"
            ) from exc
        finally:
            ticket.release()
