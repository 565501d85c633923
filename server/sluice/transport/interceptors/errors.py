"""Error mapping: Sluice's exceptions become a gRPC status with actionable details.

Anything unexpected becomes INTERNAL with the request id, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

import grpc

from sluice import callctx
from sluice.errors import SluiceError
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.status import message_for, status_for, trailers_for

log = logging.getLogger(__name__)


class ErrorInterceptor(Interceptor):
    include_operational = True

    def around(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Mapped:
        return Mapped(call, context)


class Mapped:
    """Nothing as the call enters; as it leaves with an exception, the status for it."""

    __slots__ = ("_call", "_context")

    def __init__(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._call = call
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, Exception) or isinstance(
            exc, (asyncio.CancelledError, grpc.aio.AbortError)
        ):
            return  # no error, or one that is not ours to map: it goes on as it is
        rid = callctx.request_id.get()
        if isinstance(exc, SluiceError):
            await self._context.abort(
                status_for(exc), message_for(exc, rid), trailing_metadata=trailers_for(exc, rid)
            )
        log.error("unexpected error in %s (request id %s)", self._call.method, rid, exc_info=exc)
        await self._context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; quote request id {rid} when reporting it",
            trailing_metadata=((callctx.REQUEST_ID_KEY, rid),),
        )
