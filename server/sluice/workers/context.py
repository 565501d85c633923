"""The servicer context of a call that came through the engine lane.

It behaves as grpc.aio's own does for a unary call, or a call whose responses stream (its
``write`` sends each response to the transport through the call's ``Sink``), so the
interceptors and servicers run unchanged: ``abort`` records the status and raises
``grpc.aio.AbortError`` (its trailers replace those set before, unless it gives none),
``code()`` is None until a status is set, ``time_remaining`` counts down the deadline the
transport forwarded, and ``peer`` / ``auth_context`` are the caller's as the public port saw
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

import grpc

from sluice.workers.frames import Metadata

DoneCallback = Callable[[Any], None]


class Sink(Protocol):
    """Where a streaming call's initial metadata and responses go (the engine's side of
    the lane); ``message`` returns once the response may be followed by another."""

    def headers(self, metadata: Metadata) -> None: ...

    async def message(self, data: bytes) -> None: ...


class LaneContext(grpc.aio.ServicerContext[bytes, bytes]):
    __slots__ = (
        "_auth",
        "_callbacks",
        "_code",
        "_deadline",
        "_details",
        "_done",
        "_headers_sent",
        "_initial",
        "_metadata",
        "_peer",
        "_serialize",
        "_sink",
        "_trailing",
        "aborted",
        "cancelled_by_caller",
    )

    def __init__(
        self,
        metadata: Metadata,
        *,
        deadline: float | None,
        peer: str = "",
        auth: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self._metadata = metadata
        self._deadline = deadline
        """On ``time.monotonic``; None: the call has no deadline."""
        self._peer = peer
        self._auth = auth
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()
        self._initial: Metadata | None = None
        self._sink: Sink | None = None
        self._serialize: Callable[[Any], bytes] | None = None
        self._headers_sent = False
        self._callbacks: list[DoneCallback] = []
        self._done = False
        self.aborted = False
        self.cancelled_by_caller = False

    # What the call carries.
    # grpc's stubs name grpc.aio.Metadata here; grpc itself gives (key, value) pairs.
    def invocation_metadata(self) -> Metadata:  # type: ignore[override]
        return self._metadata

    def time_remaining(self) -> float | None:  # type: ignore[override]  # None: no deadline
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = {}
        for key, value in self._auth:
            found.setdefault(key, []).append(value)
        return found

    def peer_identities(self) -> list[bytes] | None:
        key = self.peer_identity_key()
        return None if key is None else self.auth_context().get(key)

    def peer_identity_key(self) -> str | None:
        for key, value in self._auth:
            if key == "transport_security_type" and value == b"ssl":
                return "x509_common_name"
        return None

    # The status and metadata the reply carries.
    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Any = (),
    ) -> NoReturn:
        if self.aborted:
            raise grpc.aio.UsageError("Abort already called!")
        self.aborted = True
        if trailing_metadata or not self._trailing:
            self._trailing = tuple(trailing_metadata)
        if details or not self._details:
            self._details = details
        self._code = code
        raise grpc.aio.AbortError("Locally aborted.")

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:  # type: ignore[override]
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        if self._initial is not None or self._headers_sent:
            raise grpc.aio.UsageError("Send initial metadata failed: already sent")
        self._initial = tuple(initial_metadata)
        if self._sink is not None:
            self._send_headers(self._sink)

    @property
    def initial(self) -> Metadata:
        """The initial metadata still to be sent with the call's status (a stream's went
        ahead of its first response)."""
        return () if self._headers_sent else self._initial or ()

    def _send_headers(self, sink: Sink) -> None:
        self._headers_sent = True
        if self._initial:
            sink.headers(self._initial)

    def set_compression(self, compression: grpc.Compression) -> None:
        """The lane does not compress; there is nothing to set."""

    def disable_next_message_compression(self) -> None:
        """The lane does not compress; there is nothing to disable."""

    # The call's end.
    def add_done_callback(self, callback: DoneCallback) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def cancelled(self) -> bool:
        return self.cancelled_by_caller

    def done(self) -> bool:
        return self._done

    def finish(self) -> None:
        """The call ended (answered or cancelled): run the done callbacks."""
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    # Responses: a stream's go to its sink; there are never requests to read (the lane
    # carries calls with one request).
    def stream_to(self, sink: Sink, serialize: Callable[[Any], bytes] | None) -> None:
        """The call's responses stream: ``write`` encodes them with ``serialize`` (the
        handler's; None: they are bytes already) and sends them to ``sink``."""
        self._sink = sink
        self._serialize = serialize

    async def read(self) -> NoReturn:
        raise grpc.aio.UsageError("the engine lane carries one request per call: none to read")

    async def write(self, message: Any) -> None:
        sink = self._sink
        if sink is None:
            raise grpc.aio.UsageError("a unary call has no stream to write to")
        if self._serialize is not None:
            message = self._serialize(message)
        if not self._headers_sent:
            self._send_headers(sink)
        await sink.message(bytes(message))
