"""What a lane connection writes: frames in order, few system calls, bounded buffers.

Frames put in one turn of the event loop leave together, joined into one write: a batch
of calls answered together costs one system call (writing to a Unix socket also wakes
the reader, which is most of its cost), not one each.

The transport is never handed more than ``CHUNK_BYTES`` beyond what it could send, and
nothing while it is above its high-water mark: asyncio's socket transport keeps what it
could not send in one buffer that it shifts after every send, so a large frame handed to
it whole costs a copy of what is left of it per send (a 4 MiB reply cost the engine
about 8 ms that way). A large frame goes out in chunks as the peer reads, as views of
the frame, never copied whole.

While more than ``backlog_bytes`` wait here, ``on_backlog(True)`` tells the connection to
stop taking work that would add to them (the engine stops reading calls, the client stops
sending); ``on_backlog(False)`` once they are down to half.

``FramedConnection`` is what both ends of a lane connection share: frames read into a
``FrameReader``, written through an ``Outbox`` that follows the transport's flow control.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

from sluice.workers.frames import FrameReader

CHUNK_BYTES = 256 * 1024


class Outbox:
    __slots__ = (
        "_backlog_bytes",
        "_backlogged",
        "_frames",
        "_on_backlog",
        "_paused",
        "_pending",
        "_scheduled",
        "_transport",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        backlog_bytes: int,
        on_backlog: Callable[[bool], None],
    ) -> None:
        self._transport = transport
        self._frames: deque[memoryview] = deque()
        self._pending = 0
        self._scheduled = False
        self._paused = False
        self._backlog_bytes = backlog_bytes
        self._backlogged = False
        self._on_backlog = on_backlog

    def put(self, *pieces: bytes | bytearray | memoryview) -> None:
        """One frame, in pieces written one after the other (none of them copied here)."""
        for piece in pieces:
            if piece:
                self._frames.append(memoryview(piece))
                self._pending += len(piece)
        if self._pending > self._backlog_bytes and not self._backlogged:
            self._backlogged = True
            self._on_backlog(True)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def pause(self) -> None:
        """The transport is above its high-water mark: write nothing more to it."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        frames, transport = self._frames, self._transport
        while frames and not self._paused and not transport.is_closing():
            parts: list[memoryview] = []
            size = 0
            while frames and size < CHUNK_BYTES:
                head = frames[0]
                room = CHUNK_BYTES - size
                if len(head) <= room:
                    parts.append(frames.popleft())
                    size += len(head)
                else:
                    parts.append(head[:room])
                    frames[0] = head[room:]
                    size += room
            self._pending -= size
            transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if self._backlogged and self._pending <= self._backlog_bytes // 2:
            self._backlogged = False
            self._on_backlog(False)


class FramedConnection(asyncio.BufferedProtocol, abc.ABC):
    """A lane connection's reading and writing; each end says what a frame read means
    (``buffer_updated``) and what a full backlog stops (``_backlog``)."""

    def __init__(self, *, max_body_bytes: int, backlog_bytes: int) -> None:
        self._reader = FrameReader(max_body_bytes)
        self._backlog_bytes = backlog_bytes
        self._transport: asyncio.Transport | None = None
        self._outbox: Outbox | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (any loop's: uvloop's do not derive from asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._outbox = Outbox(
            transport, backlog_bytes=self._backlog_bytes, on_backlog=self._backlog
        )

    def put(self, *pieces: bytes | bytearray | memoryview) -> None:
        """One frame to the peer, in pieces (dropped once the connection is gone)."""
        if self._transport is not None and self._outbox is not None:
            self._outbox.put(*pieces)

    @abc.abstractmethod
    def _backlog(self, full: bool) -> None:
        """More than the backlog waits to be written (``full``), or it is down to half."""

    def pause_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.pause()

    def resume_writing(self) -> None:
        if self._outbox is not None:
            self._outbox.resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()
