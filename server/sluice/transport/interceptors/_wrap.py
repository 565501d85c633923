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
import asyncio
import inspect
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from sluice.errors import InvalidInputError
from sluice.transport.limits import check_strings
from sluice.transport.rpcs import Rpc, rpc
from sluice.transport.wire_size import (
    OFF_LOOP_BYTES,
    Serializer,
    encode_off_loop,
    received_message_bytes,
)

Context = grpc.aio.ServicerContext[Any, Any]


Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class MessageBound:
    """The largest request message a method can use; larger ones are refused undecoded."""

    max_bytes: int
    why: str
    """What the caller should know and do (ends the error message)."""


class CallInfo:
    """One call as an interceptor sees it."""

    __slots__ = (
        "_deserialize",
        "_metadata",
        "_raw",
        "context",
        "message_bound",
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
        #: Request messages larger than this are refused before they are decoded (set by
        #: the decoding hook for methods whose longest useful message it knows).
        self.message_bound: MessageBound | None = None
        self._metadata: tuple[tuple[str, Any], ...] | None = None

    async def decode(self) -> None:
        """Decode the request message (once); ``InvalidInputError`` when it cannot be."""
        raw, self._raw = self._raw, None
        if raw is None or self._deserialize is None:
            return
        self.request = await decode_off_loop(
            self._deserialize, raw, self.short_method, bound=self.message_bound
        )

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        """The request metadata (read from grpc once per call)."""
        if self._metadata is None:
            self._metadata = tuple(self.context.invocation_metadata() or ())
        return self._metadata

    def metadata(self, key: str) -> str:
        """The first string value of request metadata ``key``, or ``""``."""
        for name, value in self.invocation_metadata():
            if name == key and isinstance(value, str):
                return value
        return ""


def decode_message(
    deserialize: Deserializer,
    raw: bytes,
    method: str,
    index: int = 0,
    *,
    bound: MessageBound | None = None,
) -> Any:
    """One request message from its bytes, its strings within their bounds, or
    ``InvalidInputError`` saying why not (before any decoding when it is over ``bound``)."""
    where = f"message {index} of the {method} stream" if index else f"the {method} request"
    if bound is not None and len(raw) > bound.max_bytes:
        raise InvalidInputError(
            f"{where} has {len(raw)} bytes, more than the {bound.max_bytes} any such message "
            f"may have here: {bound.why}"
        )
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


async def decode_off_loop(
    deserialize: Deserializer,
    raw: bytes,
    method: str,
    index: int = 0,
    *,
    bound: MessageBound | None = None,
) -> Any:
    """``decode_message``, in a worker thread for a large message (parsing one is C work
    that holds the GIL; from a thread the event loop at least gets the GIL back between
    that and its other work)."""
    if len(raw) <= OFF_LOOP_BYTES or (bound is not None and len(raw) > bound.max_bytes):
        return decode_message(deserialize, raw, method, index, bound=bound)
    return await asyncio.to_thread(decode_message, deserialize, raw, method, index, bound=bound)


async def decoded_stream(
    call: CallInfo, messages: AsyncIterable[bytes], deserialize: Deserializer
) -> AsyncIterator[Any]:
    """The messages of a request stream, decoded one by one as they are read (each within
    the call's ``message_bound``, read when the message arrives)."""
    index = 0
    async for raw in messages:
        index += 1
        received_message_bytes.set(len(raw))
        yield await decode_off_loop(
            deserialize, raw, call.short_method, index, bound=call.message_bound
        )


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
    handler: grpc.RpcMethodHandler[Any, Any], method: str, hooks: Sequence[Around]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``hooks`` around every call, outermost first."""
    factory, attribute = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    inner = getattr(handler, attribute)
    short_method = method.rsplit("/", 1)[-1]
    kind = rpc(method)
    streaming_request = handler.request_streaming
    streaming = handler.request_streaming or handler.response_streaming
    deserialize: Deserializer = handler.request_deserializer or _identity

    def start(request: Any, context: Context) -> tuple[CallInfo, Any]:
        """The call as the hooks see it, and what the servicer gets: the decoded message
        (once a hook decoded it) or the stream of decoded messages."""
        if streaming_request:
            call = CallInfo(method, short_method, None, context, kind=kind, streaming=True)
            return call, decoded_stream(call, request, deserialize)
        call = CallInfo(
            method,
            short_method,
            None,
            context,
            kind=kind,
            streaming=streaming,
            raw=request,
            deserialize=deserialize,
        )
        return call, None

    serialize: Serializer = handler.response_serializer or _identity
    if handler.response_streaming and inspect.isasyncgenfunction(inner):
        behavior = _generated_responses(inner, start, hooks, serialize)
    elif handler.response_streaming:
        # A handler that writes its responses itself (``context.write``): grpc encodes them.
        behavior = _one_response(inner, start, hooks, None)
        return factory(
            behavior, request_deserializer=None, response_serializer=handler.response_serializer
        )
    else:
        behavior = _one_response(inner, start, hooks, serialize)
    # Messages cross the wrapper as bytes: requests are decoded by ``CallInfo.decode`` and
    # ``decoded_stream``, responses encoded by ``encode_off_loop``.
    return factory(behavior, request_deserializer=None, response_serializer=None)


Start = Callable[[Any, Context], tuple[CallInfo, Any]]


def _argument(call: CallInfo, stream: Any) -> Any:
    return stream if stream is not None else call.request


Step = Callable[[CallInfo, Context, Any], Awaitable[Any]]
"""What runs inside the hooks: the servicer, given the call, its context and its argument."""


def _handler(start: Start, hooks: Sequence[Around], step: Step) -> Callable[..., Any]:
    """The handler grpc calls: ``step`` inside ``hooks``, outermost first, one ``async
    with`` each, nested as if written out by hand (no exit stack to keep per call)."""
    for hook in reversed(hooks):
        step = _layer(hook, step)
    run = step

    async def behavior(request: Any, context: Context) -> Any:
        call, argument = start(request, context)
        del request  # the call owns it now (and drops the bytes once decoded)
        try:
            return await run(call, context, argument)
        except BaseException as exc:
            forget_frames(exc)
            raise

    return behavior


def _layer(hook: Around, inner: Step) -> Step:
    async def layer(call: CallInfo, context: Context, argument: Any) -> Any:
        async with hook(call, context):
            return await inner(call, context, argument)

    return layer


def _generated_responses(
    inner: Callable[..., Any], start: Start, hooks: Sequence[Around], serialize: Serializer
) -> Callable[..., Any]:
    """The servicer's generator is driven here and its responses written with
    ``context.write``, so the whole call (hooks and the generator's cleanup) runs in the
    handler's own task: a client that goes away cancels that task, and every ``finally``
    runs in the context the hooks set values in. (Yielding instead lets grpc abandon the
    generator mid-write; it is then closed later, in another task.)"""

    async def drive(call: CallInfo, context: Context, argument: Any) -> None:
        responses = inner(_argument(call, argument), context)
        try:
            async for response in responses:
                await context.write(await encode_off_loop(serialize, response))
        finally:
            await responses.aclose()

    return _handler(start, hooks, drive)


def _one_response(
    inner: Callable[..., Any],
    start: Start,
    hooks: Sequence[Around],
    serialize: Serializer | None,
) -> Callable[..., Any]:
    """A handler that returns its response (encoded here unless ``serialize`` is None)."""

    async def respond(call: CallInfo, context: Context, argument: Any) -> Any:
        result = inner(_argument(call, argument), context)
        result = await result if isinstance(result, Awaitable) else result
        return result if serialize is None else await encode_off_loop(serialize, result)

    return _handler(start, hooks, respond)


def forget_frames(exc: BaseException) -> None:
    """Drop the stack frames ``exc`` and the exceptions it chains hold.

    Called as a call's exception leaves the wrapper (the error hook has logged it by then).
    grpc keeps an aborted call's exception on the call's state, and its frames hold the
    servicer context that holds that state: a reference cycle that kept each failed call's
    request (its bytes, the decoded message, a prompt's text) alive until the cyclic
    garbage collector ran, which it does by object count, not size. Repeated 20 MB calls
    grew the process by about 60 MB each until then. Some frames stay in the cycle through
    other references (a context manager may keep the exception details it was given), so
    their locals are cleared as well."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # finished frames drop their locals
        current.__traceback__ = None
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _identity(raw: Any) -> Any:
    return raw


class Interceptor(abc.ABC):
    """One concern's hook around every call. ``Chain`` installs them; operational calls
    (health, reflection: ``transport.rpcs``) skip a hook unless it sets
    ``include_operational``, and a method skips a hook whose ``applies`` says so."""

    include_operational = False

    def applies(self, kind: Rpc, *, request_streaming: bool) -> bool:
        """Whether the hook acts on calls of such a method (decided once per method)."""
        return True

    @abc.abstractmethod
    def around(self, call: CallInfo, context: Context) -> AbstractAsyncContextManager[None]: ...


class Chain(grpc.aio.ServerInterceptor):
    """Installs the interceptors as one grpc interceptor, outermost first: a method's
    handler is wrapped once with the hooks that apply to it, one hop for all concerns."""

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        self._interceptors = tuple(interceptors)
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def hooks(self, method: str, *, request_streaming: bool) -> list[Around]:
        """The hooks a method's calls go through, outermost first."""
        kind = rpc(method)
        return [
            i.around
            for i in self._interceptors
            if (i.include_operational or not kind.operational)
            and i.applies(kind, request_streaming=request_streaming)
        ]

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
        hooks = self.hooks(method, request_streaming=handler.request_streaming)
        wrapped = wrap(handler, method, hooks)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
