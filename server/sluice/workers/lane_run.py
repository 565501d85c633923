"""How the engine runs a call that came through the lane (``sluice.workers.lane``): its
handler (the interceptors' wrapping of a servicer's, or a bare servicer's) given the
request and a ``LaneContext``, for a unary call or one whose responses stream."""

from __future__ import annotations

import inspect
from typing import Any

import grpc

from sluice.workers.context import LaneContext

Box = list[bytes | memoryview]
"""A call's request, in a list its handler empties (so only the handler holds it)."""


async def run_unary(
    handler: grpc.RpcMethodHandler[Any, Any], request: Box, context: LaneContext
) -> bytes:
    """The handler's response bytes (the interceptors' handlers take and give bytes; a
    bare servicer handler's messages are decoded and encoded here)."""
    message = take_request(handler, request)
    behaviour: Any = handler.unary_unary
    result = behaviour(message, context)
    del message  # the handler holds the request now, and lets it go once decoded
    response = await result if inspect.isawaitable(result) else result
    if handler.response_serializer is not None:
        response = handler.response_serializer(response)
    if not isinstance(response, bytes | bytearray | memoryview):
        raise TypeError(f"the handler's response is {type(response).__name__}, not bytes")
    return bytes(response)


async def run_streamed(
    handler: grpc.RpcMethodHandler[Any, Any],
    request: Box,
    context: LaneContext,
) -> None:
    """Run a handler whose responses stream: it writes them through ``context.write``, or
    is a generator driven here, each of its responses written the same way (the context
    encodes them with the handler's serializer, as grpc does)."""
    message = take_request(handler, request)
    behaviour: Any = handler.unary_stream
    result = behaviour(message, context)
    del message
    if inspect.isasyncgen(result):
        try:
            async for response in result:
                await context.write(response)
        finally:
            await result.aclose()
    elif inspect.isawaitable(result):
        await result
    else:  # grpc.aio too ends such a call UNKNOWN
        raise TypeError(f"a streaming handler gave {type(result).__name__}, not a stream")


def take_request(handler: grpc.RpcMethodHandler[Any, Any], box: Box) -> Any:
    """The call's request, taken out of its box (so that only the handler holds it once it
    is decoded) and decoded when the handler is a bare servicer's."""
    message: Any = box.pop()
    if handler.request_deserializer is not None:
        message = handler.request_deserializer(bytes(message))
    return message
