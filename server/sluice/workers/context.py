"""The servicer context of a call that came through the engine lane.

It behaves as grpc.aio's own does for a unary call, so the interceptors and servicers run
unchanged: ``abort`` records the status and raises ``grpc.aio.AbortError`` (its trailers
replace those set before, unless it gives none), ``code()`` is None until a status is set,
``time_remaining`` counts down the deadline the transport forwarded, and ``peer`` /
``auth_context`` are the caller's as the public port saw them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from sluice.workers.frames import Metadata

DoneCallback = Callable[[Any], None]


class LaneContext(grpc.aio.ServicerContext[bytes, bytes]):
    __slots__ = (
        "_auth",
        "_callbacks",
        "_code",
        "_deadline",
        "_details",
        "_done",
        "_initial",
        "_metadata",
        "_peer",
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
        if self._initial is not None:
            raise grpc.aio.UsageError("Send initial metadata failed: already sent")
        self._initial = tuple(initial_metadata)

    @property
    def initial(self) -> Metadata:
        return self._initial or ()

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

    # Unary calls only: no messages to read or write.
    async def read(self) -> NoReturn:
        raise grpc.aio.UsageError("the engine lane serves unary calls: there is no stream")

    async def write(self, message: bytes) -> NoReturn:
        raise grpc.aio.UsageError("the engine lane serves unary calls: there is no stream")
