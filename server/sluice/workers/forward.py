"""The hop from a transport process to the engine.

Unary calls go through ``UnaryForwarder.unary``: bytes and metadata in, a ``Reply`` out. Its
first implementation, ``GrpcForwarder``, is a grpc call over the engine's Unix socket;
anything that keeps the same contract (status, details, both sets of metadata unchanged, the
deadline honoured, cancellation when the awaiting task is cancelled) can replace it.

Every other shape (server, client and bidirectional streams, and any method this process
does not know) is relayed by ``relay_stream`` as a bidirectional stream, message by message:
the wire looks the same to both ends whatever the method's shape, and each message is read
only when the previous one has been written on (grpc's flow control), so nothing is
buffered without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc

from sluice.workers.frames import Reply

Metadata = Sequence[tuple[str, str | bytes]]
Context = grpc.aio.ServicerContext[Any, Any]


class UnaryForwarder(Protocol):
    async def unary(
        self,
        method: str,
        request: bytes,
        metadata: Metadata,
        timeout: float | None,  # noqa: ASYNC109  # the call's remaining deadline, passed on
        *,
        peer: str = "",
        auth: Sequence[tuple[str, bytes]] = (),
    ) -> Reply:
        """Make the unary call ``method`` on the engine; cancelled with the awaiting task.
        ``peer`` and ``auth`` (the caller's address and its TLS auth context) go along
        where the hop carries them; otherwise ``metadata`` says who called."""
        ...

    async def close(self) -> None: ...


def _pairs(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((key, value) for key, value in metadata or ())


def _identity(raw: bytes) -> bytes:
    return raw


class GrpcForwarder:
    """``UnaryForwarder`` and stream relay over one grpc channel to the engine's socket."""

    def __init__(self, address: str, *, max_message_bytes: int) -> None:
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.enable_retries", 0),  # the caller decides whether to retry
                # Bandwidth probing only grows each stream's receive window (to megabytes):
                # a relayed stream whose caller has stopped reading would pull that much of
                # the engine's replies into this process. 64 KiB is plenty over a Unix socket.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    async def unary(
        self,
        method: str,
        request: bytes,
        metadata: Metadata,
        timeout: float | None,  # noqa: ASYNC109  # the call's remaining deadline, passed on
        *,
        peer: str = "",
        auth: Sequence[tuple[str, bytes]] = (),
    ) -> Reply:
        # the caller's identity crosses in ``metadata`` (``transport.identity``)
        multicallable = self._unary.get(method)
        if multicallable is None:
            multicallable = self._unary[method] = self._channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
        call = multicallable(request, metadata=tuple(metadata), timeout=timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return Reply(
                exc.code(),
                exc.details() or "",
                None,
                _pairs(exc.initial_metadata()),
                _pairs(exc.trailing_metadata()),
            )
        except asyncio.CancelledError:
            call.cancel()
            raise
        return Reply(
            grpc.StatusCode.OK,
            "",
            response,
            _pairs(await call.initial_metadata()),
            _pairs(await call.trailing_metadata()),
        )

    def stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        """The engine's ``method`` as a bidirectional stream of raw messages."""
        return self._channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )

    async def close(self) -> None:
        await self._channel.close()


async def answer_unary(reply: Reply, context: Context) -> bytes:
    """Give the caller ``reply`` exactly as the engine gave it."""
    await _conclude(reply, context, ok=reply.response is not None)
    assert reply.response is not None  # else ``_conclude`` raised
    return reply.response


async def answer_stream(reply: Reply, context: Context) -> None:
    """End a call whose responses streamed (they were written) with ``reply``'s status,
    exactly as the engine gave it."""
    await _conclude(reply, context, ok=True)


async def _conclude(reply: Reply, context: Context, *, ok: bool) -> None:
    """``reply``'s initial metadata, then its trailers when it is OK (and ``ok``), else its
    status (by raising, as ``context.abort`` does)."""
    if reply.initial_metadata:
        await context.send_initial_metadata(reply.initial_metadata)
    if ok and reply.code is grpc.StatusCode.OK:
        context.set_trailing_metadata(reply.trailing_metadata)
        return
    await context.abort(reply.code, reply.details, reply.trailing_metadata)


async def _requests(incoming: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for message in incoming:
        yield message


_SEND_FAILED = "Internal error from Core"
"""The status grpc.aio's client puts on a call whose request could not be sent because the
server had already ended it."""
STATUS_WAIT_S = 0.25
"""How long a relay waits for the engine's status to replace that one (it mostly comes in
milliseconds; now and then grpc never gives it)."""
LOST_STATUS = (
    "the engine ended this stream while its requests were still arriving, and its status "
    "was lost on the way; the requests not answered were not run: resend them"
)

_Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]


class _EngineStatus:
    """The status the engine ended a relayed call with.

    When the engine ends a stream while its caller is still sending (as every stream does
    in a drain), the relay's send in flight fails, and grpc.aio's client puts INTERNAL
    "Internal error from Core" in the call's status: over the engine's own status when that
    came first (later reads of the call see only INTERNAL), or before it (the engine's then
    replaces it). Relayed as it reads, the caller would get INTERNAL, not the engine's
    UNAVAILABLE that tells it to resend what was not answered. So the first status is kept
    as it is set, and an INTERNAL of a failed send waits for the one that replaces it; if
    none does, the caller gets UNAVAILABLE (a request the engine did not take was not run,
    and a stream the engine ends before its caller stops sending is one it refuses to go
    on with: a drain, a limit)."""

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
        self._call = call
        self._first: _Status | None = None
        call.add_done_callback(self._done)

    def _done(self, call: Any) -> None:
        # Called as the status is set: reading it cannot wait (if a grpc ever made it wait,
        # nothing is kept and ``status`` reads it as it is then).
        reading = self._read()
        try:
            reading.send(None)
        except StopIteration as read:
            self._first = self._first or read.value
        else:
            reading.close()

    async def _read(self) -> _Status:
        call = self._call
        return await call.code(), await call.details() or "", _pairs(await call.trailing_metadata())

    async def status(self) -> _Status:
        status = self._first or await self._read()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + STATUS_WAIT_S
        while status[:2] == (grpc.StatusCode.INTERNAL, _SEND_FAILED):
            if loop.time() >= give_up_at:
                return grpc.StatusCode.UNAVAILABLE, LOST_STATUS, ()
            await asyncio.sleep(0.002)  # the engine's status comes in the next reads
            status = await self._read()
        return status


async def relay_stream(
    multicallable: grpc.aio.StreamStreamMultiCallable[bytes, bytes],
    incoming: AsyncIterator[bytes],
    context: Context,
    metadata: Metadata,
) -> None:
    """Relay one call of any streaming shape: the caller's messages to the engine and the
    engine's back, then the engine's status, details and trailing metadata."""
    call = multicallable(
        _requests(incoming), metadata=tuple(metadata), timeout=context.time_remaining()
    )
    ended = _EngineStatus(call)
    try:
        initial = _pairs(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        while (message := await call.read()) is not grpc.aio.EOF:
            await context.write(message)
    except grpc.aio.AioRpcError:
        pass  # the status is read below, as for a call that ended cleanly
    except BaseException:
        # The caller is gone: cancelled, or its stream broke under a write (grpc raises
        # ExecuteBatchError then, not CancelledError). The engine's call ends with it, or
        # it would hold its admission and stream window until its deadline.
        call.cancel()
        raise
    code, details, trailing = await ended.status()
    if code is grpc.StatusCode.OK:
        context.set_trailing_metadata(trailing)
        return
    await context.abort(code, details, trailing)
