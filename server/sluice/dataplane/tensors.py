"""What the data plane checks and prepares for a tensor request: the reply's size against
what one message may carry, and decoding (off the event loop when it is big)."""

from __future__ import annotations

import asyncio

from sluice.domain import InferRequest
from sluice.errors import RequestTooLargeError
from sluice.tensors import Array, InputCheck, decode_checked

REPLY_OVERHEAD_BYTES = 64 * 1024
"""Room left in a reply message for everything but the output tensors' contents (at most
an eighth of ``max_message_bytes``)."""

OFF_LOOP_DECODE_BYTES = 256 * 1024
"""Requests carrying more tensor bytes than this (or decoding more than this into Python
objects) are decoded in a worker thread: decoding BYTES and typed contents is Python work,
and a big request must not stall the event loop (a thread hands the GIL back every few
milliseconds)."""


def reply_limit(max_message_bytes: int) -> int:
    """The most output bytes a reply may carry within ``max_message_bytes``."""
    return max_message_bytes - min(REPLY_OVERHEAD_BYTES, max_message_bytes // 8)


def check_reply_size(size: int, limit: int, model: str, *, known: bool) -> None:
    """``RequestTooLargeError`` when a reply (``known``: as the output shapes say before the
    model runs) would not fit in one message."""
    if size <= limit:
        return
    when = "its output shapes say the reply would be" if known else "the reply is"
    raise RequestTooLargeError(
        f"model '{model}': {when} {size} bytes, more than the {limit} a reply may carry "
        "(max_message_bytes); send fewer rows or request fewer outputs"
    )


async def decode(request: InferRequest, checked: InputCheck) -> dict[str, Array]:
    """The request's validated inputs as arrays."""
    if max(checked.payload_bytes, checked.decoded_bytes) <= OFF_LOOP_DECODE_BYTES:
        return decode_checked(request)
    return await asyncio.to_thread(decode_checked, request)
