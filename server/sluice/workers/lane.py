"""The engine lane: unary calls from the transport workers to the engine over a Unix socket.

``sluice serve --workers N`` runs N transport processes on the public port and one engine
process with the models. A transport worker forwards each unary call (its method, request
bytes, metadata, deadline and the caller's identity) to the engine through a
``LaneClient``; the engine's ``LaneServer`` runs it through exactly the handler chain the
engine's own grpc server runs (``transport.server.MethodTable``: the interceptors, then
the servicer) with a ``LaneContext``, and sends back the status, details, metadata and
response bytes a grpc call would have given. A call costs the engine one small frame each
way instead of a full grpc call.

Many calls share one connection (frames carry a call id), each in its own task. A caller
that goes away sends a cancel frame and its call's task is cancelled, as grpc cancels a
handler; a closed connection cancels all of its calls; a call past its deadline is
cancelled too. Everything is bounded: a frame by the server's message limit plus a
metadata allowance, the calls of one connection by ``LaneSettings.max_calls_per_connection``
(more are refused with RESOURCE_EXHAUSTED), and what waits to be written by the socket's
write buffer (a connection whose peer does not read stops being read).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from sluice.transport.server import MethodTable
from sluice.workers.context import LaneContext
from sluice.workers.frames import (
    CALL,
    CANCEL,
    MAX_CALL_ID,
    REPLY,
    CallFrame,
    FrameError,
    FrameReader,
    Oversize,
    Reply,
    decode_call,
    decode_reply,
    encode_call,
    encode_reply,
    frame,
)
from sluice.workers.outbox import Outbox

log = logging.getLogger(__name__)


class LaneSettings(BaseModel):
    """The engine lane between the transport workers and the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_calls_per_connection: int = Field(4096, ge=1)
    """Calls one transport connection may have running in the engine at once; more are
    refused with RESOURCE_EXHAUSTED (admission sheds long before this in normal use)."""
    max_metadata_bytes: int = Field(64 * 1024, ge=1024)
    """Bytes a call frame may carry beyond its message (method, metadata, identity); with
    the server's ``max_message_bytes``, the largest frame the engine reads."""
    deadline_grace_s: float = Field(0.1, ge=0.0)
    """How long after a call's deadline the engine cancels a call still running (its
    deadline hook normally ends it first, with DEADLINE_EXCEEDED and a message that says
    which budget ran out; this stops handlers that have no such hook)."""
    max_backlog_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    """Reply bytes waiting for a connection's peer to read them beyond which the engine
    reads no more calls from it (until half have gone); the client likewise stops sending
    calls while this many call bytes wait."""


class LaneMetrics:
    """The lane's gauges and counters, in the server's registry."""

    def __init__(self, registry: CollectorRegistry, settings: LaneSettings) -> None:
        self.connections = Gauge(
            "sluice_lane_connections",
            "Transport connections to the engine lane.",
            registry=registry,
        )
        self.calls = Gauge(
            "sluice_lane_calls", "Calls running in the engine through the lane.", registry=registry
        )
        self.refused = Counter(
            "sluice_lane_refused",
            "Lane calls refused before they ran, by reason (calls: over the per-connection "
            "limit; frame: over the frame size limit; malformed: unreadable frame).",
            ["reason"],
            registry=registry,
        )
        limit = Gauge(
            "sluice_lane_max_calls_per_connection",
            "The lane's limit on calls running per connection.",
            registry=registry,
        )
        limit.set(settings.max_calls_per_connection)


class LaneServer:
    """The engine's side: serves lane connections on a Unix socket."""

    def __init__(
        self,
        methods: MethodTable,
        *,
        max_message_bytes: int,
        settings: LaneSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or LaneSettings()
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_message_bytes + self.settings.max_metadata_bytes
        self.metrics = LaneMetrics(registry or CollectorRegistry(), self.settings)
        self._methods = methods
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[_EngineConnection] = set()

    async def start(self, path: str | Path) -> None:
        """Listen on ``path`` (a stale socket file there is replaced), owner-only."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _EngineConnection(self), str(path))
        os.chmod(path, 0o600)
        log.info("engine lane listening on %s", path)

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening and close the connections: the calls still running are
        cancelled, and replies already made get ``grace_s`` to be read before the
        connections are cut. (Drain the server first to let calls finish.)"""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        try:
            async with asyncio.timeout(grace_s):
                for connection in connections:
                    await connection.finished()
        except TimeoutError:
            for connection in connections:
                connection.abort()
            for connection in connections:
                await connection.finished()
        if self._server is not None:
            await self._server.wait_closed()

    async def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = self._handlers.get(method)
        if found is None:
            found = await self._methods.handler(method)
            if found is not None:  # only real methods are kept: callers cannot grow this
                self._handlers[method] = found
        return found


class _EngineCall:
    __slots__ = ("context", "expired", "task", "timer")

    def __init__(self, context: LaneContext) -> None:
        self.context = context
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        if self.task is not None:
            self.task.cancel()


class _EngineConnection(asyncio.BufferedProtocol):
    def __init__(self, lane: LaneServer) -> None:
        self._lane = lane
        self._reader = FrameReader(lane.max_frame_bytes)
        self._calls: dict[int, _EngineCall] = {}
        self._transport: asyncio.Transport | None = None
        self._outbox: Outbox | None = None
        self._closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._outbox = Outbox(
            transport,
            backlog_bytes=self._lane.settings.max_backlog_bytes,
            on_backlog=self._backlog,
        )
        self._lane._connections.add(self)
        self._lane.metrics.connections.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._lane._connections.discard(self)
        self._lane.metrics.connections.dec()
        for call in self._calls.values():
            call.context.cancelled_by_caller = True
            if call.task is not None:
                call.task.cancel()
        if not self._closed.done():
            self._closed.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def finished(self) -> None:
        """Return once the connection is closed and its calls have ended."""
        await self._closed
        tasks = [call.task for call in self._calls.values() if call.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _backlog(self, full: bool) -> None:
        # The peer is not reading its replies: read no more calls until it does.
        if self._transport is not None:
            if full:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.pause()

    def resume_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for kind, call_id, body in self._reader.feed(nbytes):
            if kind == CALL:
                self._start(call_id, body)
            elif kind == CANCEL:
                call = self._calls.get(call_id)
                if call is not None and call.task is not None:
                    call.context.cancelled_by_caller = True
                    call.task.cancel()
            else:
                log.warning("engine lane: a frame of unknown kind %d; closing", kind)
                self.close()
                return

    def _start(self, call_id: int, body: bytes | bytearray | Oversize) -> None:
        lane = self._lane
        if call_id in self._calls:
            log.warning("engine lane: call id %d reused while running; closing", call_id)
            self.close()
            return
        if isinstance(body, Oversize):
            lane.metrics.refused.labels("frame").inc()
            self._refuse(call_id, _too_large(body.size, lane.max_frame_bytes))
            return
        if len(self._calls) >= lane.settings.max_calls_per_connection:
            lane.metrics.refused.labels("calls").inc()
            self._refuse(
                call_id,
                f"the engine is running {len(self._calls)} calls from this transport "
                f"connection, its limit (lane max_calls_per_connection); retry shortly",
            )
            return
        try:
            call = decode_call(body)
        except FrameError as exc:
            lane.metrics.refused.labels("malformed").inc()
            self._send(call_id, _status(grpc.StatusCode.INTERNAL, f"engine lane: {exc}"))
            return
        if len(call.request) > lane.max_message_bytes:
            lane.metrics.refused.labels("frame").inc()
            self._refuse(call_id, _too_large(len(call.request), lane.max_message_bytes))
            return
        deadline = None if call.timeout_s is None else time.monotonic() + call.timeout_s
        context = LaneContext(call.metadata, deadline=deadline, peer=call.peer, auth=call.auth)
        running = _EngineCall(context)
        self._calls[call_id] = running
        lane.metrics.calls.inc()
        running.task = asyncio.get_running_loop().create_task(self._serve(call_id, call, running))
        if call.timeout_s is not None:
            running.timer = asyncio.get_running_loop().call_later(
                max(call.timeout_s, 0.0) + lane.settings.deadline_grace_s, running.expire
            )

    def _refuse(self, call_id: int, details: str) -> None:
        self._send(call_id, _status(grpc.StatusCode.RESOURCE_EXHAUSTED, details))

    async def _serve(self, call_id: int, call: CallFrame, running: _EngineCall) -> None:
        context = running.context
        reply: Reply | None
        try:
            reply = await self._run(call, context)
        except asyncio.CancelledError:
            # As grpc: the handler saw a cancellation. A caller that went away gets nothing;
            # one whose deadline passed gets DEADLINE_EXCEEDED.
            if context.cancelled_by_caller:
                reply = None
            elif running.expired:
                reply = _status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            else:  # the handler ended in a cancellation of its own
                reply = _status(grpc.StatusCode.CANCELLED, "Cancelled")
        except Exception:  # a fault of the lane itself: the caller still gets a status
            log.exception("engine lane: %s failed outside its handler", call.method[:200])
            reply = _status(grpc.StatusCode.INTERNAL, "the engine lane failed to run this call")
        finally:
            del self._calls[call_id]
            self._lane.metrics.calls.dec()
            if running.timer is not None:
                running.timer.cancel()
            context.finish()
        if reply is not None:
            self._send(call_id, reply)

    async def _run(self, call: CallFrame, context: LaneContext) -> Reply:
        handler = await self._lane.handler(call.method)
        if handler is None:
            return _status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if handler.request_streaming or handler.response_streaming:
            return _status(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{call.method} streams; the engine lane carries unary calls only",
            )
        try:
            response = await _unary(handler, call.request, context)
        except grpc.aio.AbortError:
            return self._ended(context, None)
        except Exception as exc:  # what grpc's server answers for an exception it is given
            return Reply(
                grpc.StatusCode.UNKNOWN,
                f"Unexpected {type(exc)}: {exc}",
                None,
                context.initial,
                context.trailing_metadata(),
            )
        if len(response) > self._lane.max_message_bytes:
            return _status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(response)} vs. "
                f"{self._lane.max_message_bytes})",
            )
        return self._ended(context, response)

    @staticmethod
    def _ended(context: LaneContext, response: bytes | None) -> Reply:
        code = context.code() or grpc.StatusCode.OK
        return Reply(
            code,
            context.details(),
            response if code is grpc.StatusCode.OK else None,
            context.initial,
            context.trailing_metadata(),
        )

    def _send(self, call_id: int, reply: Reply) -> None:
        if self._transport is not None and self._outbox is not None:
            self._outbox.put(encode_reply(call_id, reply))


async def _unary(
    handler: grpc.RpcMethodHandler[Any, Any], request: bytes | memoryview, context: LaneContext
) -> bytes:
    """The handler's response bytes (the interceptors' handlers take and give bytes; a
    bare servicer handler's messages are decoded and encoded here)."""
    message: Any = request
    if handler.request_deserializer is not None:
        message = handler.request_deserializer(bytes(request))
    behaviour: Any = handler.unary_unary
    result = behaviour(message, context)
    response = await result if inspect.isawaitable(result) else result
    if handler.response_serializer is not None:
        response = handler.response_serializer(response)
    if not isinstance(response, bytes | bytearray | memoryview):
        raise TypeError(f"the handler's response is {type(response).__name__}, not bytes")
    return bytes(response)


def _status(code: grpc.StatusCode, details: str) -> Reply:
    return Reply(code, details, None, (), ())


def _too_large(size: int, limit: int) -> str:
    return f"Received message larger than max ({size} vs. {limit})"


class LaneClient:
    """The transport's side: unary calls to the engine over one multiplexed connection,
    opened on first use and again after the engine restarts."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_reply_bytes: int = 2**31,
        max_backlog_bytes: int = LaneSettings().max_backlog_bytes,
    ) -> None:
        self.path = str(path)
        self.max_reply_bytes = max_reply_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Lock | None = None

    async def unary(
        self,
        method: str,
        request: bytes,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 (grpc's call signature)
        *,
        peer: str = "",
        auth: Sequence[tuple[str, bytes]] = (),
    ) -> Reply:
        """Call ``method``. A cancelled caller's call is cancelled in the engine too; one
        past its deadline ends DEADLINE_EXCEEDED here and is ended by the engine at the
        same deadline (its deadline hook says so in the engine's metrics and logs)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):  # connecting, and room to write
                connection = await self._connect()
                await connection.writable()
        except TimeoutError:
            return _deadline_exceeded()
        except OSError as exc:
            return _unavailable(f"cannot reach the engine at {self.path}: {exc}")
        call = CallFrame(method, request, tuple(metadata), None, peer, tuple(auth))
        return await connection.call(call, deadline)

    async def _connect(self) -> _ClientConnection:
        connection = self._connection
        if connection is not None and connection.open:
            return connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            connection = self._connection
            if connection is None or not connection.open:
                loop = asyncio.get_running_loop()
                _, connection = await loop.create_unix_connection(
                    lambda: _ClientConnection(self.max_reply_bytes, self.max_backlog_bytes),
                    self.path,
                )
                self._connection = connection
            return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


class _ClientConnection(asyncio.BufferedProtocol):
    def __init__(self, max_reply_bytes: int, max_backlog_bytes: int) -> None:
        self._backlog_bytes = max_backlog_bytes
        self._reader = FrameReader(max_reply_bytes)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._outbox: Outbox | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.get_running_loop().create_future()
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._outbox = Outbox(
            transport, backlog_bytes=self._backlog_bytes, on_backlog=self._backlog
        )
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._transport = None
        self._writable.set()  # writers wake up and find the connection gone
        lost = Reply(
            grpc.StatusCode.UNAVAILABLE,
            "the connection to the engine closed before the call finished",
            None,
            (),
            (),
        )
        for future in self._pending.values():
            if not future.done():
                future.set_result(lost)
        self._pending.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    def _backlog(self, full: bool) -> None:
        # The engine is not reading its calls: callers wait rather than add to the backlog.
        if full:
            self._writable.clear()
        else:
            self._writable.set()

    def pause_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.pause()

    def resume_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for kind, call_id, body in self._reader.feed(nbytes):
            future = self._pending.pop(call_id, None)
            if future is None or future.done():
                continue  # a call its caller gave up on
            if kind != REPLY:
                future.set_result(_unavailable(f"engine lane: a frame of unknown kind {kind}"))
            elif isinstance(body, Oversize):
                future.set_result(
                    Reply(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        _too_large(body.size, self._reader.max_body_bytes),
                        None,
                        (),
                        (),
                    )
                )
            else:
                future.set_result(_reply(body))

    async def writable(self) -> None:
        """Return once calls may be written (the engine is reading what was sent)."""
        while not self._writable.is_set():
            await self._writable.wait()

    async def call(self, call: CallFrame, deadline: float | None) -> Reply:
        outbox = self._outbox
        if self._transport is None or outbox is None:
            return _unavailable("the connection to the engine closed")
        loop = asyncio.get_running_loop()
        call_id = self._next_id
        while call_id in self._pending:  # only after 2**32 calls, with one still running
            call_id = 0 if call_id == MAX_CALL_ID else call_id + 1
        self._next_id = 0 if call_id == MAX_CALL_ID else call_id + 1
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[call_id] = future
        timer = None
        if deadline is not None:
            call = dataclasses.replace(call, timeout_s=deadline - loop.time())
            timer = loop.call_at(deadline, self._expire, call_id)
        outbox.put(encode_call(call_id, call))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and self._transport is not None:
                outbox.put(frame(CANCEL, call_id))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, call_id: int) -> None:
        """The call's deadline passed: its caller is answered now. No cancel is sent: the
        engine ends the call at the same deadline, through its own deadline hook."""
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            future.set_result(_deadline_exceeded())

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            await self._lost


def _reply(body: bytes | bytearray) -> Reply:
    try:
        return decode_reply(body)
    except FrameError as exc:
        return _unavailable(f"engine lane: {exc}")


def _deadline_exceeded() -> Reply:
    return Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None, (), ())


def _unavailable(details: str) -> Reply:
    return Reply(grpc.StatusCode.UNAVAILABLE, details, None, (), ())


async def forward(
    lane: LaneClient, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> bytes | None:
    """Serve one unary call of a transport's public port through the engine: its metadata,
    deadline and caller go along, and what the engine answered (status, details, metadata,
    response bytes) is what the caller gets."""
    reply = await lane.unary(
        method,
        request,
        tuple(context.invocation_metadata() or ()),
        context.time_remaining(),
        peer=context.peer(),
        auth=tuple(
            (key, value) for key, values in context.auth_context().items() for value in values
        ),
    )
    if reply.initial_metadata:
        await context.send_initial_metadata(reply.initial_metadata)
    if reply.code is not grpc.StatusCode.OK:
        await context.abort(reply.code, reply.details, reply.trailing_metadata)
    context.set_trailing_metadata(reply.trailing_metadata)
    return reply.response
