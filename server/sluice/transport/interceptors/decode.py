"""Decoding: the request message is decoded here, inside the error mapping, so a message
that is not valid protobuf (or carries a string field that is not UTF-8) ends the call with
INVALID_ARGUMENT, the request id and a count in the metrics, never grpc's UNKNOWN. The
caller's strings are bounded here too (``transport.limits``): the message's names, ids and
reasons, and the ``x-request-id`` metadata.

Every hook after this one sees ``call.request`` decoded. Messages of a request stream are
decoded (and bounded) as the servicer reads them (see ``_wrap.decoded_stream``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from sluice import callctx
from sluice.errors import InvalidInputError
from sluice.transport.interceptors._entering import Entering
from sluice.transport.interceptors._wrap import CallInfo, Interceptor, MessageBound
from sluice.transport.limits import (
    MAX_REQUEST_ID_CHARS,
    PROMPT_MESSAGE_ROOM_BYTES,
    valid_request_id,
)


class DecodeInterceptor(Interceptor):
    """``longest_prompt_bytes``: the most UTF-8 bytes of prompt any model served now takes
    (0 when none generates). A message of a method that carries prompts with more bytes
    than that plus the room its other fields may take (``PROMPT_MESSAGE_ROOM_BYTES``) is
    refused before it is decoded: decoding it, and making its prompt a Python string, would
    hold the GIL for tens of milliseconds at 20 MB only to refuse it after."""

    include_operational = True

    def __init__(self, longest_prompt_bytes: Callable[[], int]) -> None:
        self._longest_prompt_bytes = longest_prompt_bytes

    def around(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Entering:
        return Entering(self._decode(call))

    async def _decode(self, call: CallInfo) -> None:
        given = call.metadata(callctx.REQUEST_ID_KEY)
        if given and not valid_request_id(given):
            raise InvalidInputError(
                f"metadata '{callctx.REQUEST_ID_KEY}' must be at most {MAX_REQUEST_ID_CHARS} "
                f"printable ASCII characters (got {len(given)} characters)"
            )
        if call.rpc.prompts:
            longest = self._longest_prompt_bytes()
            call.message_bound = MessageBound(
                longest + PROMPT_MESSAGE_ROOM_BYTES,
                f"its prompt is longer than the {longest} bytes the largest context of the "
                "models served here could hold; shorten the prompt"
                if longest
                else "no model served here generates text",
            )
        await call.decode()
