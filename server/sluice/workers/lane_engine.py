"""The engine's side of the lane (``sluice.workers.lane``): serves calls from transport
connections through the server's own handler chain, unary ones and those whose responses
stream (each response a MESSAGE frame, within the call's window: ``lane_stream.Window``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from sluice.transport.server import MethodTable
from sluice.workers import shm
from sluice.workers.context import LaneContext
from sluice.workers.frames import (
    CALL,
    CALL_SHARED,
    CANCEL,
    CREDIT,
    CallFrame,
    FrameError,
    Oversize,
    Reply,
    decode_call,
    decode_credit,
    reply_frame,
    too_large,
)
from sluice.workers.lane_run import Box, run_streamed, run_unary
from sluice.workers.lane_settings import LaneMetrics, LaneSettings
from sluice.workers.lane_stream import Window
from sluice.workers.outbox import FramedConnection

log = logging.getLogger(__name__)


class LaneServer:
    """The engine's side: serves lane connections on a Unix socket."""

    def __init__(
        self,
        methods: MethodTable,
        *,
        max_message_bytes: int,
        settings: LaneSettings | None = None,
        metrics: LaneMetrics | None = None,
    ) -> None:
        self.settings = settings or LaneSettings()
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_message_bytes + self.settings.max_metadata_bytes
        self.metrics = metrics or LaneMetrics(CollectorRegistry())
        self.metrics.max_calls_per_connection.set(self.settings.max_calls_per_connection)
        self.metrics.max_streams_per_connection.set(self.settings.max_streams_per_connection)
        self.metrics.stream_window_bytes.set(self.settings.stream_window_bytes)
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
    __slots__ = ("context", "expired", "streamed", "task", "timer", "window")

    def __init__(self, context: LaneContext, streamed: int) -> None:
        self.context = context
        self.streamed = streamed
        """The window of a call whose responses stream (0: a unary call)."""
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False
        self.window: Window | None = None

    def expire(self) -> None:
        self.expired = True
        if self.task is not None:
            self.task.cancel()


class _EngineConnection(FramedConnection):
    def __init__(self, lane: LaneServer) -> None:
        super().__init__(
            max_body_bytes=lane.max_frame_bytes, backlog_bytes=lane.settings.max_backlog_bytes
        )
        self._lane = lane
        self._calls: dict[int, _EngineCall] = {}
        self._streams = 0
        """How many of ``_calls`` stream their responses."""
        self._closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
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

    def buffer_updated(self, nbytes: int) -> None:
        for kind, call_id, body in self._reader.feed(nbytes):
            if kind in (CALL, CALL_SHARED):
                self._start(call_id, body, shared=kind == CALL_SHARED)
            elif kind == CANCEL:
                call = self._calls.get(call_id)
                if call is not None and call.task is not None:
                    call.context.cancelled_by_caller = True
                    call.task.cancel()
            elif kind == CREDIT:
                if not self._credit(call_id, body):
                    return
            else:
                log.warning("engine lane: a frame of unknown kind %d; closing", kind)
                self.close()
                return

    def _credit(self, call_id: int, body: bytes | bytearray | Oversize) -> bool:
        """Give a stream the credit a frame carries; False (and the connection closes) when
        the frame cannot be read."""
        try:
            if isinstance(body, Oversize):
                raise FrameError(f"a credit frame of {body.size} bytes")
            credit = decode_credit(body)
        except FrameError as exc:
            log.warning("engine lane: %s; closing", exc)
            self.close()
            return False
        call = self._calls.get(call_id)
        if call is not None and call.window is not None:  # else: the call has ended
            call.window.credit(credit)
        return True

    def _start(self, call_id: int, body: bytes | bytearray | Oversize, *, shared: bool) -> None:
        lane = self._lane
        if call_id in self._calls:
            log.warning("engine lane: call id %d reused while running; closing", call_id)
            self.close()
            return
        call = self._read(call_id, body, shared=shared)
        if call is None:
            return
        if call.window:  # streams are counted apart: a watch never ends
            running_now, kind = self._streams, "streams"
            limit = lane.settings.max_streams_per_connection
        else:
            running_now, kind = len(self._calls) - self._streams, "calls"
            limit = lane.settings.max_calls_per_connection
        if running_now >= limit:
            lane.metrics.refused.labels(kind).inc()
            self._refuse(
                call_id,
                f"the engine is running {running_now} {kind} from this transport connection, "
                f"its limit (lane max_{kind}_per_connection); retry shortly",
            )
            return
        deadline = None if call.timeout_s is None else time.monotonic() + call.timeout_s
        context = LaneContext(call.metadata, deadline=deadline, peer=call.peer, auth=call.auth)
        running = _EngineCall(context, call.window)
        self._calls[call_id] = running
        lane.metrics.calls.inc()
        if call.window:
            self._streams += 1
            lane.metrics.streams.inc()
        # The request travels in a box the handler empties: once the interceptors have
        # decoded it, nothing here keeps its bytes alive for the rest of the call.
        request = [call.request]
        running.task = asyncio.get_running_loop().create_task(
            self._serve(call_id, call.method, request, running)
        )
        # A task cancelled before its first step (its CANCEL frame came in the same read,
        # or the connection closed) never enters ``_serve``: it is forgotten here instead.
        running.task.add_done_callback(lambda _: self._forget(call_id, running))
        if call.timeout_s is not None:
            running.timer = asyncio.get_running_loop().call_later(
                max(call.timeout_s, 0.0) + lane.settings.deadline_grace_s, running.expire
            )

    def _read(
        self, call_id: int, body: bytes | bytearray | Oversize, *, shared: bool
    ) -> CallFrame | None:
        """The call a frame carries (its shared request taken, and so removed, before
        anything can refuse it), or None once it is refused."""
        lane = self._lane
        if isinstance(body, Oversize):
            lane.metrics.refused.labels("frame").inc()
            self._refuse(call_id, too_large(body.size, lane.max_frame_bytes))
            return None
        try:
            call = decode_call(body)
            if shared:
                view = shm.take(bytes(call.request).decode(), lane.max_message_bytes)
                call = dataclasses.replace(call, request=view)
        except (FrameError, UnicodeDecodeError, OSError) as exc:
            lane.metrics.refused.labels("malformed").inc()
            self._send(call_id, _status(grpc.StatusCode.INTERNAL, f"engine lane: {exc}"))
            return None
        except ValueError as exc:  # a shared request over the limit
            lane.metrics.refused.labels("frame").inc()
            self._refuse(call_id, str(exc))
            return None
        if len(call.request) > lane.max_message_bytes:
            lane.metrics.refused.labels("frame").inc()
            self._refuse(call_id, too_large(len(call.request), lane.max_message_bytes))
            return None
        return call

    def _refuse(self, call_id: int, details: str) -> None:
        self._send(call_id, _status(grpc.StatusCode.RESOURCE_EXHAUSTED, details))

    async def _serve(self, call_id: int, method: str, request: Box, running: _EngineCall) -> None:
        context = running.context
        reply: Reply | None
        try:
            reply = await self._run(method, request, running, call_id)
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
            log.exception("engine lane: %s failed outside its handler", method[:200])
            reply = _status(grpc.StatusCode.INTERNAL, "the engine lane failed to run this call")
        finally:
            self._forget(call_id, running)
        if reply is not None:
            self._send(call_id, reply)

    def _forget(self, call_id: int, running: _EngineCall) -> None:
        """The call ended: it leaves the connection's table (once)."""
        if self._calls.get(call_id) is not running:
            return
        del self._calls[call_id]
        self._lane.metrics.calls.dec()
        if running.streamed:
            self._streams -= 1
            self._lane.metrics.streams.dec()
        if running.timer is not None:
            running.timer.cancel()
        running.context.finish()

    async def _run(self, method: str, request: Box, running: _EngineCall, call_id: int) -> Reply:
        context = running.context
        handler = await self._lane.handler(method)
        if handler is None:
            return _status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if handler.request_streaming:
            return _status(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} takes a stream of requests; the engine lane carries calls with one",
            )
        if handler.response_streaming != bool(running.streamed):  # a transport's bug
            shape = "streams its responses" if handler.response_streaming else "is unary"
            made = "unary" if handler.response_streaming else "with streamed responses"
            return _status(
                grpc.StatusCode.INTERNAL, f"engine lane: {method} {shape}; it was called {made}"
            )
        if handler.response_streaming:
            running.window = Window(
                self.put,
                call_id,
                context,
                limit=running.streamed,
                max_message_bytes=self._lane.max_message_bytes,
                waits=self._lane.metrics.stream_waits,
            )
            context.stream_to(running.window, handler.response_serializer)
        try:
            if handler.response_streaming:
                await run_streamed(handler, request, context)
                return self._ended(context, None)
            response = await run_unary(handler, request, context)
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
        self.put(*reply_frame(call_id, reply))


def _status(code: grpc.StatusCode, details: str) -> Reply:
    return Reply(code, details, None, (), ())
