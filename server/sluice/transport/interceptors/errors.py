"""Error mapping: Sluice's exceptions become a gRPC status with actionable details.

Anything unexpected becomes INTERNAL with the request id, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import callctx
from sluice.errors import SluiceError
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.status import message_for, status_for, trailers_for

log = logging.getLogger(__name__)


class ErrorInterceptor(Interceptor):
    include_operational = True

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        try:
            yield
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except SluiceError as exc:
            rid = callctx.request_id.get()
            await context.abort(
                status_for(exc), message_for(exc, rid), trailing_metadata=trailers_for(exc, rid)
            )
        except Exception:
            rid = callctx.request_id.get()
            log.exception("unexpected error in %s (request id %s)", call.method, rid)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error; quote request id {rid} when reporting it",
                trailing_metadata=((callctx.REQUEST_ID_KEY, rid),),
            )
