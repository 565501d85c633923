"""The one helper that wraps every RPC kind, so unary and streaming calls get the same
treatment. An interceptor supplies ``around``: an async context manager entered before the
handler runs and left when the call (or the whole stream) ends.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc

# Health and reflection must answer even when the server sheds load or drains.
OPERATIONAL_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class CallInfo:
    method: str
    #: The request message for unary-request calls; None for client-streaming calls.
    request: Any
    metadata: dict[str, str]

    @property
    def short_method(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    @property
    def operational(self) -> bool:
        return self.method.startswith(OPERATIONAL_SERVICES)


Around = Callable[[CallInfo, grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]

Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {
        key: value for key, value in (details.invocation_metadata or ()) if isinstance(value, str)
    }


def wrap(
    handler: grpc.RpcMethodHandler[Any, Any], details: grpc.HandlerCallDetails, around: Around
) -> grpc.RpcMethodHandler[Any, Any]:
    kind = (handler.request_streaming, handler.response_streaming)
    factory, attribute = _FACTORIES[kind]
    inner = getattr(handler, attribute)
    method, metadata = details.method, _metadata(details)

    def info(request: Any) -> CallInfo:
        return CallInfo(method, None if handler.request_streaming else request, metadata)

    behavior: Callable[..., Any]
    if handler.response_streaming and inspect.isasyncgenfunction(inner):

        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with around(info(request), context):
                async for response in inner(request, context):
                    yield response

    else:

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(info(request), context):
                result = inner(request, context)
                return await result if isinstance(result, Awaitable) else result

    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Interceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """Base: wraps every handler with ``around``; operational calls skip it unless
    ``include_operational`` is set."""

    include_operational = False

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if not self.include_operational and handler_call_details.method.startswith(
            OPERATIONAL_SERVICES
        ):
            return handler
        return wrap(handler, handler_call_details, self.around)

    @abc.abstractmethod
    def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AbstractAsyncContextManager[None]: ...
