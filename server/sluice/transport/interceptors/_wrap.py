"""The one helper that wraps every RPC kind, so unary and streaming calls get the same
treatment. An interceptor supplies ``around``: an async context manager entered before the
handler runs and left when the call (or the whole stream) ends.

Wrapped handlers depend only on the method, so ``Chain`` wraps a method once and reuses it;
per-call facts (metadata, the request) are read when the call runs.

Requests reach the wrapper as bytes and are decoded inside the hooks (``CallInfo.decode``
for unary requests, ``decoded_stream`` for each message of a request stream), so a message
grpc could not decode is an ``InvalidInputError`` like any other bad input: it gets
INVALID_ARGUMENT with the request id and is counted, instead of grpc's bare UNKNOWN.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import Message

from sluice.errors import InvalidInputError
from sluice.transport.limits import check_strings
from sluice.transport.rpcs import Rpc, rpc

Context = grpc.aio.ServicerContext[Any, Any]


Deserializer = Callable[[bytes], Any]


class CallInfo:
    """One call as an interceptor sees it."""

    __slots__ = (
        "_deserialize",
        "_raw",
        "context",
        "method",
        "request",
        "rpc",
        "short_method",
        "size",
        "streaming",
    )

    def __init__(
        self,
        method: str,
        short_method: str,
        request: Any,
        context: Context,
        *,
        kind: Rpc,
        streaming: bool = False,
        raw: bytes | None = None,
        deserialize: Deserializer | None = None,
    ) -> None:
        self.method = method
        self.short_method = short_method
        #: What the method is (``transport.rpcs``).
        self.rpc = kind
        #: The request message for unary-request calls once decoded; None for
        #: client-streaming calls (and before ``decode``).
        self.request = request
        self.context = context
        #: The call streams requests, responses or both.
        self.streaming = streaming
        self._raw = raw
        self._deserialize = deserialize
        #: The request message's size on the wire (unary-request calls; 0 for streams).
        self.size = len(raw) if raw is not None else 0

    def decode(self) -> None:
        """Decode the request message (once); ``InvalidInputError`` when it cannot be."""
        raw, self._raw = self._raw, None
        if raw is None or self._deserialize is None:
            return
        self.request = decode_message(self._deserialize, raw, self.short_method)

    def metadata(self, key: str) -> str:
        """The first string value of request metadata ``key``, or ``""``."""
        for name, value in self.context.invocation_metadata() or ():
            if name == key and isinstance(value, str):
                return value
        return ""


def decode_message(deserialize: Deserializer, raw: bytes, method: str, index: int = 0) -> Any:
    """One request message from its bytes, its strings within their bounds, or
    ``InvalidInputError`` saying why not."""
    where = f"message {index} of the {method} stream" if index else f"the {method} request"
    try:
        message = deserialize(raw)
    except Exception as exc:  # protobuf's DecodeError, or anything a parser raises
        raise InvalidInputError(
            f"{where} could not be decoded ({len(raw)} bytes): {exc}; check that the client "
            "sends this method's protobuf message and that every string field is UTF-8"
        ) from exc
    if isinstance(message, Message):
        try:
            check_strings(message)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc.message}") from exc
    return message


async def decoded_stream(
    messages: AsyncIterable[bytes], deserialize: Deserializer, method: str
) -> AsyncIterator[Any]:
    """The messages of a request stream, decoded one by one as they are read."""
    index = 0
    async for raw in messages:
        index += 1
        yield decode_message(deserialize, raw, method, index)


Around = Callable[[CallInfo, Context], AbstractAsyncContextManager[None]]

Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, around: Around
) -> grpc.RpcMethodHandler[Any, Any]:
    factory, attribute = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    inner = getattr(handler, attribute)
    short_method = method.rsplit("/", 1)[-1]
    kind = rpc(method)
    streaming_request = handler.request_streaming
    streaming = handler.request_streaming or handler.response_streaming
    deserialize: Deserializer = handler.request_deserializer or _identity

    def info(request: Any, context: Context) -> CallInfo:
        if streaming_request:
            return CallInfo(method, short_method, None, context, kind=kind, streaming=True)
        return CallInfo(
            method,
            short_method,
            None,
            context,
            kind=kind,
            streaming=streaming,
            raw=request,
            deserialize=deserialize,
        )

    def argument(call: CallInfo, request: Any) -> Any:
        if streaming_request:
            return decoded_stream(request, deserialize, short_method)
        return call.request

    behavior: Callable[..., Any]
    if handler.response_streaming and inspect.isasyncgenfunction(inner):
        # The servicer's generator is driven here and its responses written with
        # ``context.write``, so the whole call (hooks and the generator's cleanup) runs in
        # the handler's own task: a client that goes away cancels that task, and every
        # ``finally`` runs in the context the hooks set values in. (Yielding instead lets
        # grpc abandon the generator mid-write; it is then closed later, in another task.)

        async def behavior(request: Any, context: Context) -> None:
            call = info(request, context)
            async with around(call, context):
                responses = inner(argument(call, request), context)
                try:
                    async for response in responses:
                        await context.write(response)
                finally:
                    await responses.aclose()

    else:

        async def behavior(request: Any, context: Context) -> Any:
            call = info(request, context)
            async with around(call, context):
                result = inner(argument(call, request), context)
                return await result if isinstance(result, Awaitable) else result

    # Requests arrive as bytes: ``CallInfo.decode`` and ``decoded_stream`` decode them.
    return factory(
        behavior,
        request_deserializer=None,
        response_serializer=handler.response_serializer,
    )


def _identity(raw: bytes) -> bytes:
    return raw


class Interceptor(abc.ABC):
    """One concern's hook around every call. ``Chain`` installs them; operational calls
    (health, reflection: ``transport.rpcs``) skip a hook unless it sets
    ``include_operational``."""

    include_operational = False

    @abc.abstractmethod
    def around(self, call: CallInfo, context: Context) -> AbstractAsyncContextManager[None]: ...


class Chain(grpc.aio.ServerInterceptor):
    """Installs the interceptors as one grpc interceptor, outermost first: a method's
    handler is wrapped once with all their ``around`` hooks nested, so a call pays for one
    interceptor hop instead of one per concern.
    """

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        self._all = _nest([i.around for i in interceptors])
        self._operational = _nest([i.around for i in interceptors if i.include_operational])
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        around = self._operational if rpc(method).operational else self._all
        wrapped = wrap(handler, method, around)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _nest(hooks: Sequence[Around]) -> Around:
    @asynccontextmanager
    async def nested(call: CallInfo, context: Context) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for hook in hooks:
                await stack.enter_async_context(hook(call, context))
            yield

    return nested
