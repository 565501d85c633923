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
    if reply.initial_metadata:
        await context.send_initial_metadata(reply.initial_metadata)
    if reply.code is grpc.StatusCode.OK and reply.response is not None:
        context.set_trailing_metadata(reply.trailing_metadata)
        return reply.response
    await context.abort(reply.code, reply.details, reply.trailing_metadata)
    raise AssertionError("abort returns only by raising")  # pragma: no cover


async def _requests(incoming: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for message in incoming:
        yield message


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
    code = await call.code()
    trailing = _pairs(await call.trailing_metadata())
    if code is grpc.StatusCode.OK:
        context.set_trailing_metadata(trailing)
        return
    await context.abort(code, await call.details() or "", trailing)
