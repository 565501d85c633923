"""Calls whose responses stream over the engine lane (``sluice.workers.lane``): the engine
side's ``Window`` (each response a MESSAGE frame, within the call's window); the transport
side's ``LaneStream`` (the responses as they arrive, and the CREDIT that lets the engine
send more)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeAlias

import grpc
from prometheus_client import Counter

from sluice.workers.context import LaneContext
from sluice.workers.frames import HEAD, MESSAGE, Metadata, Reply, framed, headers_frame

# The engine's side.


class Window:
    """A streaming call's responses: each goes out as a MESSAGE frame, and the call waits
    while its transport has not yet given back ``stream_window_bytes`` of them (CREDIT:
    written to the caller). Each message counts its bytes and a frame head, so a stream of
    empty messages is bounded too."""

    __slots__ = (
        "_ahead",
        "_call_id",
        "_context",
        "_limit",
        "_max_message",
        "_put",
        "_room",
        "_waits",
    )

    def __init__(
        self,
        put: Callable[..., None],
        call_id: int,
        context: LaneContext,
        *,
        limit: int,
        max_message_bytes: int,
        waits: Counter,
    ) -> None:
        self._put = put
        self._call_id = call_id
        self._context = context
        self._limit = limit
        self._max_message = max_message_bytes
        self._waits = waits
        self._ahead = 0
        self._room = asyncio.Event()
        self._room.set()

    def headers(self, metadata: Metadata) -> None:
        self._put(headers_frame(self._call_id, metadata))

    async def message(self, data: bytes) -> None:
        if len(data) > self._max_message:
            await self._context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(data)} vs. {self._max_message})",
            )
        while self._ahead >= self._limit:
            self._waits.inc()
            self._room.clear()
            await self._room.wait()
        self._put(*framed(MESSAGE, self._call_id, (), data))
        self._ahead += len(data) + HEAD.size

    def credit(self, nbytes: int) -> None:
        self._ahead = max(self._ahead - nbytes, 0)
        if self._ahead < self._limit:
            self._room.set()


# The transport's side.


class Credits(Protocol):
    """The connection a ``LaneStream`` came on."""

    def credit(self, call_id: int, nbytes: int) -> None: ...

    def forget(self, stream: LaneStream, *, cancel: bool) -> None: ...


Item: TypeAlias = "bytes | Metadata | Reply"
"""What a stream gives: a response, the initial metadata (before the first response, when
there is some), and last the status."""


class LaneStream:
    """One streaming call's responses as they arrive. ``next`` gives them in order, then
    the call's ``Reply`` (always last: a call cut short ends with an error status, never
    OK). ``taken`` says a response has gone on to the caller: every ``credit_every`` bytes
    the engine is told, so it may send more. Leaving early: ``cancel``."""

    __slots__ = ("_connection", "_credit_every", "_items", "_untold", "_waiter", "call_id", "done")

    def __init__(self, connection: Credits | None, call_id: int, credit_every: int) -> None:
        self._connection = connection
        self.call_id = call_id
        self._credit_every = credit_every
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._untold = 0
        self.done = False
        """The status has arrived (it may still be waiting behind responses)."""

    @classmethod
    def ended(cls, reply: Reply) -> LaneStream:
        stream = cls(None, 0, 0)
        stream.end(reply)
        return stream

    def add(self, item: bytes | bytearray | Metadata) -> None:
        if not self.done:
            self._items.append(bytes(item) if isinstance(item, bytearray) else item)
            self._wake()

    def end(self, reply: Reply) -> None:
        if not self.done:
            self.done = True
            self._items.append(reply)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Item:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def taken(self, nbytes: int) -> None:
        """A response of ``nbytes`` has been written to the caller."""
        self._untold += nbytes + HEAD.size
        if self._untold >= self._credit_every and self._connection is not None:
            self._connection.credit(self.call_id, self._untold)
            self._untold = 0

    def cancel(self, *, tell_engine: bool = True) -> None:
        """Done with the call: the engine stops it unless it has ended (or, without
        ``tell_engine``, it is left to end at its deadline)."""
        if self._connection is not None:
            self._connection.forget(self, cancel=tell_engine and not self.done)
            self._connection = None
        self._items.clear()
