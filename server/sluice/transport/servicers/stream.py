"""ModelStreamInfer: many requests pipelined over one bidirectional stream.

One reader task takes requests off the stream and starts one task per request (at most
``max_pending`` at a time, so a client that does not read cannot make us buffer without
bound). Every request gets the same admission, deadline and breaker rules as a unary call
(the ``CallPolicy``). Responses go out in the order the requests arrived, each with the
request's ``id``: Triton does so for every model that is not decoupled, and clients such as
tritonclient's stream callback, which gets no id with an error, rely on it. Requests still
run concurrently; one that finishes early waits for those before it, holding its
``max_pending`` slot until it is written. Generation models are decoupled: once a
generation's turn comes, its responses go out as they are made, interleaved with the
responses of later requests (each names its request id), and it holds its slot until it
ends. At most ``max_pending`` responses wait to be written; a generation that cannot hand
one over stops reading its stream, and the scheduler pauses it. Bytes are bounded too: the
requests a stream has read and not yet answered, and their replies until written, hold at
most ``max_pending_bytes`` of the stream's window (reading pauses past it), and each holds
its admission ticket (request and reply bytes, server-wide) until its response is written,
so a client that never reads holds a bounded amount of memory. A failed request becomes a
response with ``error_message`` and the stream stays open, unless the client sent the
``triton_grpc_error: true`` header: then the first error (in request order) ends the call
with its real status.

When the server starts draining, a stream stops reading, finishes and writes the requests
it has, and then ends with UNAVAILABLE (the client sends the rest elsewhere); a stream the
client had already half-closed just finishes. A message that cannot be read (it does not
decode) ends the stream the same way: the requests before it are answered, then the call
ends with INVALID_ARGUMENT naming the message, so nothing is silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from sluice import callctx
from sluice.admission import AdmissionController, Ticket
from sluice.domain import InferResult
from sluice.errors import DrainingError, SluiceError
from sluice.policy import Admitted, CallPolicy
from sluice.routing import Router
from sluice.transport import convert
from sluice.transport.servicers.decoupled import DecoupledReplies, Reply, error_reply
from sluice.transport.servicers.reading import read_failure
from sluice.transport.status import message_for, status_for, trailers_for
from sluice.transport.wire_size import received_message_bytes
from sluice_api.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_END = object()


class ByteWindow:
    """The bytes one stream holds; its reader waits while the window is full (one request
    always fits an empty window, however large)."""

    def __init__(self, limit: int, on_change: Callable[[int], None]) -> None:
        self._limit = limit
        self._used = 0
        self._on_change = on_change
        self._freed = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self._used and self._used + size > self._limit:
            self._freed.clear()
            await self._freed.wait()
        self.add(size)

    def add(self, size: int) -> None:
        self._used += size
        self._on_change(size)

    def release(self, size: int) -> None:
        self._used -= size
        self._on_change(-size)
        self._freed.set()


@dataclass(eq=False, slots=True)
class _Answer:
    """A response (or the error that ends the call) to write, and what it holds until it
    is written: bytes of the stream's window and the request's admission ticket."""

    reply: Reply | bytes  # bytes: a large response, encoded in a worker thread
    size: int = 0
    ticket: Ticket | None = None

    def done(self, window: ByteWindow) -> None:
        window.release(self.size)
        self.size = 0
        if self.ticket is not None:
            self.ticket.release()


#: What one request's task produces: its answer, or a generation model's responses.
_Served = _Answer | tuple[DecoupledReplies, int]


class StreamInferSession:
    def __init__(
        self,
        router: Router,
        context: Context,
        *,
        policy: CallPolicy,
        admission: AdmissionController,
        max_pending: int,
        max_pending_bytes: int,
    ) -> None:
        self._router = router
        self._context = context
        self._policy = policy
        self._admission = admission
        self._slots = asyncio.Semaphore(max_pending)
        self._window = ByteWindow(max_pending_bytes, admission.count_stream_bytes)
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._grpc_errors = metadata.get("triton_grpc_error", "").lower() == "true"
        self._tenant = policy.tenant(context.invocation_metadata() or ())
        self._metadata = tuple(context.invocation_metadata() or ())
        #: One task per request, in arrival order, then ``_END``.
        self._out: asyncio.Queue[asyncio.Task[_Served] | object] = asyncio.Queue()
        self._tasks: set[asyncio.Task[_Served]] = set()
        #: What the writer sends next, in order, then ``_END`` (bounded: backpressure).
        self._responses: asyncio.Queue[_Answer | object] = asyncio.Queue(max_pending)
        self._pumps: set[asyncio.Task[None]] = set()
        #: Why reading stopped before the client finished sending (ends the call).
        self._read_error: SluiceError | None = None

    async def run(
        self, requests: AsyncIterator[pb.ModelInferRequest]
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        reader = asyncio.create_task(self._read(requests))
        drain = asyncio.create_task(self._stop_reading_on_drain(reader))
        orderer = asyncio.create_task(self._order())
        try:
            while (item := await self._responses.get()) is not _END:
                assert isinstance(item, _Answer)
                try:
                    yield await self._checked(item.reply)
                finally:
                    item.done(self._window)
            if self._read_error is not None:
                raise self._read_error
            if drain.done() and drain.result():
                raise DrainingError(
                    "the server is draining: this stream took no more requests after the "
                    "responses already sent; send the rest on another replica"
                )
        finally:
            for task in (drain, reader, orderer, *self._tasks, *self._pumps):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, orderer, *self._pumps, return_exceptions=True)
            await self._close_unwritten()

    async def _order(self) -> None:
        """Hand the writer each request's answer in arrival order; a generation's replies
        are pumped from then on, beside the later requests'."""
        while (item := await self._out.get()) is not _END:
            assert isinstance(item, asyncio.Task)
            try:
                served = await item
            except BaseException:
                self._slots.release()
                raise
            if isinstance(served, tuple):
                pump = asyncio.create_task(self._pump(*served))
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)
                continue
            self._slots.release()
            await self._responses.put(served)
        await asyncio.gather(*self._pumps)
        await self._responses.put(_END)

    async def _pump(self, replies: DecoupledReplies, size: int) -> None:
        try:
            async with contextlib.aclosing(replies.replies()) as parts:
                async for part in parts:
                    await self._responses.put(_Answer(part))
        finally:
            self._slots.release()
            self._window.release(size)

    async def _close_unwritten(self) -> None:
        """Answers that will never be written give back what they hold; generations
        started for requests whose responses will never be written (the call ended first)
        stop now, and give back their admission."""
        while not self._responses.empty():
            answer = self._responses.get_nowait()
            if isinstance(answer, _Answer):
                answer.done(self._window)
        while not self._out.empty():
            item = self._out.get_nowait()
            if isinstance(item, asyncio.Task) and item.done() and not item.cancelled():
                served = item.result()
                if isinstance(served, tuple):
                    await served[0].close()
                    self._window.release(served[1])
                else:
                    served.done(self._window)

    async def _checked(self, reply: Reply | bytes) -> pb.ModelStreamInferResponse | bytes:
        """A response to write; an error (``triton_grpc_error`` mode) ends the call."""
        if isinstance(reply, bytes):
            return reply
        if isinstance(reply, SluiceError):
            rid = callctx.request_id.get()
            await self._context.abort(
                status_for(reply),
                message_for(reply, rid),
                trailing_metadata=trailers_for(reply, rid),
            )
        assert isinstance(reply, pb.ModelStreamInferResponse)
        return reply

    async def _stop_reading_on_drain(self, reader: asyncio.Task[None]) -> bool:
        """Once a drain begins, stop reading; True when that cut the client's sending short."""
        await self._admission.wait_drain()
        if reader.done():
            return False
        reader.cancel()
        return True

    async def _read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        count = 0
        try:
            async for request in requests:
                size = received_message_bytes.get()  # as it came (set by decoded_stream)
                if size < 0:
                    size = request.ByteSize()
                await self._window.acquire(size)
                await self._slots.acquire()
                task = asyncio.create_task(self._serve(request, size))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self._out.put_nowait(task)
                count += 1
        except Exception as exc:
            self._read_error = read_failure(exc, after=count)
        finally:
            self._out.put_nowait(_END)

    async def _serve(self, request: pb.ModelInferRequest, size: int) -> _Served:
        try:
            if self._router.generates(request.model_name, request.model_version):
                return await self._start_generation(request, size), size
            result, ticket = await self._infer(request, size)
        except SluiceError as exc:
            return _Answer(error_reply(request, exc, grpc_errors=self._grpc_errors), size)
        except Exception:
            log.exception("a stream request failed unexpectedly")
            return _Answer(
                pb.ModelStreamInferResponse(
                    error_message=f"internal error; quote request id {callctx.request_id.get()}",
                    infer_response=pb.ModelInferResponse(id=request.id),
                ),
                size,
            )
        try:  # the ticket is this task's to release until the answer holds it
            answer = await convert.encoded_stream_reply(result)
        except BaseException:
            ticket.release()
            raise
        reply_size = len(answer)
        self._window.add(reply_size)
        return _Answer(answer, size + reply_size, ticket)

    async def _start_generation(self, request: pb.ModelInferRequest, size: int) -> DecoupledReplies:
        """A generation model's request, started (its first token made) on this task; its
        responses are written in turn, while the generation goes on."""
        generation_request, stream = self._router.text_generation(convert.infer_request(request))
        admitted = self._admit(request, size)
        try:
            async with self._policy.within(admitted.budget_s, f"request '{request.id}'"):
                generation = await self._router.generate(generation_request, admitted.call)
        except BaseException:
            admitted.ticket.release()
            raise
        return DecoupledReplies(
            generation,
            request,
            stream=stream,
            ticket=admitted.ticket,
            grpc_errors=self._grpc_errors,
        )

    async def _infer(self, request: pb.ModelInferRequest, size: int) -> tuple[InferResult, Ticket]:
        """One tensor request's result, and its admission ticket, held until its response
        is written."""
        domain = convert.infer_request(request)
        admitted = self._admit(request, size)
        try:
            async with self._policy.within(admitted.budget_s, f"request '{domain.id}'"):
                result = await self._router.infer(domain, admitted.call)
        except BaseException:
            admitted.ticket.release()
            raise
        return result, admitted.ticket

    def _admit(self, request: pb.ModelInferRequest, size: int) -> Admitted:
        """One request through the rules a unary call passes (``CallPolicy``)."""
        return self._policy.admit_request(
            tenant=self._tenant,
            request_bytes=size,
            remaining_s=self._context.time_remaining(),
            timeout_s=convert.timeout_parameter_s(request),
            model=request.model_name,
            version=request.model_version,
            priority=self._policy.priority(self._metadata, convert.priority_parameter(request)),
        )
