"""The transport's side of the lane (``sluice.workers.lane``): calls to the engine over one
multiplexed connection (``workers.transport.Proxy`` sends its public port's unary calls and
calls whose responses stream through it)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import grpc

from sluice.logs import Every
from sluice.workers import shm
from sluice.workers.frames import (
    CANCEL,
    HEADERS,
    MAX_CALL_ID,
    MESSAGE,
    REPLY,
    Buffer,
    CallFrame,
    FrameError,
    Oversize,
    Reply,
    call_frame,
    credit_frame,
    decode_headers,
    decode_reply,
    frame,
    too_large,
)
from sluice.workers.lane_settings import LaneSettings
from sluice.workers.lane_stream import LaneStream
from sluice.workers.outbox import FramedConnection

log = logging.getLogger(__name__)
#: A full /dev/shm is said once a minute, however many requests it turns to the socket.
_SHM_FALLBACKS = Every(60.0)


class LaneClient:
    """The transport's side: calls to the engine (``unary``, and ``stream`` for those with
    streamed responses) over one multiplexed connection, opened on first use and again
    after the engine restarts."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_reply_bytes: int = 2**31,
        max_backlog_bytes: int = LaneSettings().max_backlog_bytes,
        shared_min_bytes: int = LaneSettings().shared_min_bytes,
        stream_window_bytes: int = LaneSettings().stream_window_bytes,
    ) -> None:
        self.path = str(path)
        self.max_reply_bytes = max_reply_bytes
        self.max_backlog_bytes = max_backlog_bytes
        #: The window each call with streamed responses asks the engine to keep to (its
        #: CALL frame carries it): credit goes back each time half of it has been taken.
        self.stream_window_bytes = stream_window_bytes
        #: Requests this large or larger go through shared memory (0: never).
        self.shared_min_bytes = shared_min_bytes if shm.available() else 0
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
        deadline = _deadline(timeout)
        connection = await self._ready(deadline)
        if isinstance(connection, Reply):
            return connection
        call = CallFrame(method, request, tuple(metadata), _left(deadline), peer, tuple(auth))
        return await connection.call(call, deadline)

    async def stream(
        self,
        method: str,
        request: bytes,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 (grpc's call signature)
        *,
        peer: str = "",
        auth: Sequence[tuple[str, bytes]] = (),
    ) -> LaneStream:
        """Call ``method``, whose responses stream: read them with ``LaneStream.next``. The
        engine ends the call at its deadline; ``LaneStream.cancel`` ends it sooner."""
        deadline = _deadline(timeout)
        connection = await self._ready(deadline)
        if isinstance(connection, Reply):
            return LaneStream.ended(connection)
        window = self.stream_window_bytes
        call = CallFrame(
            method, request, tuple(metadata), _left(deadline), peer, tuple(auth), window
        )
        return connection.stream(call)

    async def _ready(self, deadline: float | None) -> _ClientConnection | Reply:
        """The connection, open and taking calls; or why there is none by ``deadline``
        (on the loop's clock)."""
        connection = self._connection
        if connection is None or not connection.ready:
            try:
                async with asyncio.timeout_at(deadline):  # connecting, and room to write
                    connection = await self._connect()
                    await connection.writable()
            except TimeoutError:
                return _deadline_exceeded()
            except OSError as exc:
                return _unavailable(f"cannot reach the engine at {self.path}: {exc}")
        return connection

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
                    lambda: _ClientConnection(
                        self.max_reply_bytes, self.max_backlog_bytes, self.shared_min_bytes
                    ),
                    self.path,
                )
                self._connection = connection
            return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


class _ClientConnection(FramedConnection):
    def __init__(self, max_reply_bytes: int, max_backlog_bytes: int, shared_min: int) -> None:
        super().__init__(max_body_bytes=max_reply_bytes, backlog_bytes=max_backlog_bytes)
        self._shared_min = shared_min
        # Shared files sent and maybe not yet taken, in send order, and each call's place
        # in that order: the engine reads frames in order, so once any call is answered,
        # every file sent before it has been taken (and its name removed).
        self._shared: deque[tuple[int, str]] = deque()
        self._order: dict[int, int] = {}
        self._sent = 0
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, LaneStream] = {}
        self._next_id = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.get_running_loop().create_future()
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
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
        for stream in self._streams.values():  # after the responses already read
            stream.end(lost)
        self._streams.clear()
        for _, name in self._shared:  # the engine may not have read these frames
            shm.remove(name)
        self._shared.clear()
        self._order.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    def _backlog(self, full: bool) -> None:
        # The engine is not reading its calls: callers wait rather than add to the backlog.
        if full:
            self._writable.clear()
        else:
            self._writable.set()

    def buffer_updated(self, nbytes: int) -> None:
        for kind, call_id, body in self._reader.feed(nbytes):
            sent = self._order.pop(call_id, None)
            while sent is not None and self._shared and self._shared[0][0] <= sent:
                self._shared.popleft()
            stream = self._streams.get(call_id)
            if stream is not None:
                if not self._to_stream(stream, kind, body):
                    del self._streams[call_id]
                continue
            future = self._pending.pop(call_id, None)
            if future is None or future.done():
                continue  # a call its caller gave up on
            if kind != REPLY:  # e.g. a stream's response: its call is not unary; end it
                future.set_result(
                    _unavailable(f"engine lane: a frame of kind {kind} for a unary call")
                )
                self.put(frame(CANCEL, call_id))
            elif isinstance(body, Oversize):
                future.set_result(
                    Reply(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        too_large(body.size, self._reader.max_body_bytes),
                        None,
                        (),
                        (),
                    )
                )
            else:
                future.set_result(_reply(body))

    def _to_stream(self, stream: LaneStream, kind: int, body: bytes | bytearray | Oversize) -> bool:
        """Give ``stream`` what a frame carries; False once that ended it."""
        if isinstance(body, Oversize):  # over the limit the engine keeps to: end the call
            too_big = too_large(body.size, self._reader.max_body_bytes)
            stream.end(Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, too_big, None, (), ()))
            self.put(frame(CANCEL, stream.call_id))
            return False
        if kind == MESSAGE:
            stream.add(body)
            return True
        if kind == HEADERS:
            try:
                stream.add(decode_headers(body))
            except FrameError as exc:
                stream.end(_unavailable(f"engine lane: {exc}"))
                self.put(frame(CANCEL, stream.call_id))
                return False
            return True
        if kind == REPLY:
            reply = _reply(body)
            if reply.response is not None:  # a unary answer: never end a stream OK without it
                reply = _unavailable("engine lane: a unary reply to a call with streamed responses")
            stream.end(reply)
        else:
            stream.end(_unavailable(f"engine lane: a frame of unknown kind {kind}"))
            self.put(frame(CANCEL, stream.call_id))
        return False

    def _new_id(self) -> int:
        call_id = self._next_id
        while call_id in self._pending or call_id in self._streams:  # after 2**32 calls
            call_id = 0 if call_id == MAX_CALL_ID else call_id + 1
        self._next_id = 0 if call_id == MAX_CALL_ID else call_id + 1
        return call_id

    def stream(self, call: CallFrame) -> LaneStream:
        if self._transport is None or self._outbox is None:
            return LaneStream.ended(_unavailable("the connection to the engine closed"))
        call_id = self._new_id()
        stream = LaneStream(self, call_id, max(call.window // 2, 1))
        self._streams[call_id] = stream
        self._outbox.put(*self._frame(call_id, call))
        return stream

    def forget(self, stream: LaneStream, *, cancel: bool) -> None:
        """``stream``'s caller is done with it: a call still running is cancelled."""
        if self._streams.get(stream.call_id) is stream:
            del self._streams[stream.call_id]
            self._order.pop(stream.call_id, None)  # no answer will come
            if cancel:
                self.put(frame(CANCEL, stream.call_id))

    def credit(self, call_id: int, nbytes: int) -> None:
        if call_id in self._streams:
            self.put(credit_frame(call_id, nbytes))

    @property
    def ready(self) -> bool:
        """Open, and calls may be written now."""
        return self.open and self._writable.is_set()

    async def writable(self) -> None:
        """Return once calls may be written (the engine is reading what was sent)."""
        while not self._writable.is_set():
            await self._writable.wait()

    async def call(self, call: CallFrame, deadline: float | None) -> Reply:
        outbox = self._outbox
        if self._transport is None or outbox is None:
            return _unavailable("the connection to the engine closed")
        loop = asyncio.get_running_loop()
        call_id = self._new_id()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[call_id] = future
        timer = None if deadline is None else loop.call_at(deadline, self._expire, call_id)
        outbox.put(*self._frame(call_id, call))
        try:
            return await future
        except asyncio.CancelledError:
            self._order.pop(call_id, None)  # no answer will come
            if self._pending.pop(call_id, None) is not None and self._transport is not None:
                outbox.put(frame(CANCEL, call_id))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _frame(self, call_id: int, call: CallFrame) -> tuple[bytes, Buffer]:
        sent, self._sent = self._sent, self._sent + 1
        self._order[call_id] = sent
        if self._shared_min and len(call.request) >= self._shared_min:
            try:
                name = shm.write(call.request)
            except OSError as exc:  # /dev/shm full or gone: the socket still carries it
                if (held := _SHM_FALLBACKS.due()) is not None:
                    more = f" ({held} more since the last such warning)" if held else ""
                    log.warning("engine lane: a request goes by the socket: %s%s", exc, more)
            else:
                self._shared.append((sent, name))
                return call_frame(call_id, call, shared=name)
        return call_frame(call_id, call)

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


def _deadline(timeout: float | None) -> float | None:
    """A call's deadline on the running loop's clock (None: none)."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def _left(deadline: float | None) -> float | None:
    """What is left of ``deadline`` now, for the engine to keep to."""
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


def _reply(body: bytes | bytearray) -> Reply:
    try:
        return decode_reply(body)
    except FrameError as exc:
        return _unavailable(f"engine lane: {exc}")


def _deadline_exceeded() -> Reply:
    return Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None, (), ())


def _unavailable(details: str) -> Reply:
    return Reply(grpc.StatusCode.UNAVAILABLE, details, None, (), ())
