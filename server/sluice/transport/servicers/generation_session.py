"""GenerateStream: a bidirectional session of generations, tagged with the client's ids.

One reader task takes the client's messages: ``start`` begins a generation (its own task,
admitted and given a deadline like a unary call, at most ``max_running`` at a time),
``cancel`` ends one at the next decode step (its last message says CANCELLED, with usage).
Chunks of all generations go out interleaved as they come. A generation that fails ends
with FINISH_REASON_ERROR and its status; the session goes on. A message that cannot be
read (it does not decode, or carries neither ``start`` nor ``cancel``) stops the reading:
the running generations finish, then the session ends with that error's status.
Backpressure: at most ``max_running`` messages wait to be written; a generation that
cannot hand over its chunk stops reading its stream, and the scheduler pauses its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import callctx, logs
from sluice.admission import AdmissionController
from sluice.dataplane import Generation
from sluice.domain import FinishReason
from sluice.errors import DrainingError, InvalidInputError, SluiceError
from sluice.policy import CallPolicy
from sluice.routing import Router
from sluice.transport.generation_convert import generate_response, generation_request
from sluice.transport.servicers.reading import read_failure
from sluice.transport.status import message_for, status_for
from sluice_api.sluice.v1 import generation_service_pb2 as gen

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_END = object()


class GenerationSession:
    def __init__(
        self,
        router: Router,
        context: Context,
        *,
        policy: CallPolicy,
        admission: AdmissionController,
        max_running: int,
        default_max_new_tokens: int,
    ) -> None:
        self._router = router
        self._context = context
        self._policy = policy
        self._admission = admission
        self._default_max_new_tokens = default_max_new_tokens
        self._tenant = policy.tenant(context.invocation_metadata() or ())
        self._metadata = tuple(context.invocation_metadata() or ())
        self._slots = asyncio.Semaphore(max_running)
        self._room = asyncio.Semaphore(max_running)
        self._out: asyncio.Queue[gen.GenerateStreamResponse | SluiceError | object] = (
            asyncio.Queue()
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._generations: dict[str, Generation] = {}
        self._cancelled: set[str] = set()

    async def run(
        self, requests: AsyncIterator[gen.GenerateStreamRequest]
    ) -> AsyncIterator[gen.GenerateStreamResponse]:
        reader = asyncio.create_task(self._session(requests))
        try:
            while True:
                item = await self._out.get()
                if item is _END:
                    break
                if isinstance(item, SluiceError):
                    raise item
                assert isinstance(item, gen.GenerateStreamResponse)
                self._room.release()
                yield item
        finally:
            reader.cancel()
            tasks = [reader, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _session(self, requests: AsyncIterator[gen.GenerateStreamRequest]) -> None:
        """Read until the client is done (or a drain begins, or a message cannot be read:
        then stop reading), let the running generations finish, then end the session (with
        a status when reading stopped early)."""
        reader = asyncio.create_task(self._read(requests))
        drain = asyncio.create_task(self._admission.wait_drain())
        try:
            await asyncio.wait({reader, drain}, return_when=asyncio.FIRST_COMPLETED)
            ending: SluiceError | None = None
            if not reader.done():
                ending = DrainingError(
                    "the server is draining: this session took no more generations after "
                    "the ones it finished; start the rest on another replica"
                )
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                ending = await reader or ending
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            if ending is not None:
                self._out.put_nowait(ending)
        finally:
            drain.cancel()
            self._out.put_nowait(_END)

    async def _read(self, requests: AsyncIterator[gen.GenerateStreamRequest]) -> SluiceError | None:
        """Start and cancel generations as the client asks; the error that stopped the
        reading, if one did."""
        count = 0
        try:
            async for message in requests:
                action = message.WhichOneof("action")
                if action == "start":
                    await self._start(message.start)
                elif action == "cancel":
                    self._cancel(message.cancel.request_id)
                else:
                    raise InvalidInputError(
                        f"message {count + 1} of the session has neither 'start' nor 'cancel'"
                    )
                count += 1
        except Exception as exc:
            return read_failure(exc, after=count)
        return None

    async def _start(self, start: gen.StartGeneration) -> None:
        request_id = start.request_id
        running = self._tasks.get(request_id)
        if running is not None and not running.done():
            error = InvalidInputError(
                f"request_id '{request_id}' is already running in this session; ids must be "
                "unique among running generations"
            )
            await self._send(_error_response(request_id, error))
            return
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(request_id, start.request))
        self._tasks[request_id] = task
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for request_id, known in list(self._tasks.items()):
            if known is task:
                del self._tasks[request_id]

    def _cancel(self, request_id: str) -> None:
        """Cancel a running generation; an id that already ended (a race) is ignored."""
        generation = self._generations.get(request_id)
        if generation is not None:
            generation.cancel()
            return
        task = self._tasks.get(request_id)
        if task is not None:  # still starting: stop waiting for its first token
            self._cancelled.add(request_id)
            task.cancel()

    async def _serve(self, request_id: str, request: gen.GenerateRequest) -> None:
        try:
            await self._generate(request_id, request)
        except asyncio.CancelledError:
            if request_id not in self._cancelled:
                raise
            await self._send(
                gen.GenerateStreamResponse(
                    request_id=request_id,
                    chunk=gen.GenerateResponse(finish_reason=gen.FINISH_REASON_CANCELLED),
                )
            )
        except SluiceError as exc:
            await self._send(_error_response(request_id, exc))
        except Exception:
            log.exception("generation %s failed unexpectedly", logs.clip(request_id))
            await self._send(_error_response(request_id, SluiceError("internal error")))
        finally:
            self._slots.release()
            self._generations.pop(request_id, None)
            self._cancelled.discard(request_id)

    async def _generate(self, request_id: str, request: gen.GenerateRequest) -> None:
        domain = generation_request(
            request, default_max_new_tokens=self._default_max_new_tokens, request_id=request_id
        )
        admitted = self._policy.admit_request(
            tenant=self._tenant,
            request_bytes=request.ByteSize(),
            remaining_s=self._context.time_remaining(),
            model=domain.model,
            version=domain.version,
            priority=self._policy.priority(self._metadata),
        )
        try:
            async with self._policy.within(admitted.budget_s, f"generation '{request_id}'"):
                generation = await self._router.generate(domain, admitted.call)
                self._generations[request_id] = generation
                async with generation:
                    async for chunk in generation:
                        await self._send(_chunk(request_id, generate_response(generation, chunk)))
                if generation.finish_reason is FinishReason.CANCELLED:
                    await self._send(_chunk(request_id, generate_response(generation, None)))
        finally:
            admitted.ticket.release()

    async def _send(self, response: gen.GenerateStreamResponse) -> None:
        await self._room.acquire()
        self._out.put_nowait(response)


def _chunk(request_id: str, response: gen.GenerateResponse) -> gen.GenerateStreamResponse:
    return gen.GenerateStreamResponse(request_id=request_id, chunk=response)


def _error_response(request_id: str, exc: SluiceError) -> gen.GenerateStreamResponse:
    return gen.GenerateStreamResponse(
        request_id=request_id,
        chunk=gen.GenerateResponse(finish_reason=gen.FINISH_REASON_ERROR),
        error=gen.GenerationError(
            code=status_for(exc).value[0], message=message_for(exc, callctx.request_id.get())
        ),
    )
