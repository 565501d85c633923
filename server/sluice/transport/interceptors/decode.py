"""Decoding: the request message is decoded here, inside the error mapping, so a message
that is not valid protobuf (or carries a string field that is not UTF-8) ends the call with
INVALID_ARGUMENT, the request id and a count in the metrics, never grpc's UNKNOWN. The
caller's strings are bounded here too (``transport.limits``): the message's names, ids and
reasons, and the ``x-request-id`` metadata.

Every hook after this one sees ``call.request`` decoded. Messages of a request stream are
decoded (and bounded) as the servicer reads them (see ``_wrap.decoded_stream``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.errors import InvalidInputError
from sluice.transport import callctx
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.limits import MAX_REQUEST_ID_CHARS, valid_request_id


class DecodeInterceptor(Interceptor):
    include_operational = True

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        given = call.metadata(callctx.REQUEST_ID_KEY)
        if given and not valid_request_id(given):
            raise InvalidInputError(
                f"metadata '{callctx.REQUEST_ID_KEY}' must be at most {MAX_REQUEST_ID_CHARS} "
                f"printable ASCII characters (got {len(given)} characters)"
            )
        await call.decode()
        yield
