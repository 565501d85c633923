"""The engine lane's wire format: length-prefixed binary frames on a Unix socket.

Every frame starts with ``HEAD``: the body's length, the frame's kind and the call id it
belongs to (many calls share one connection). Bodies are struct-packed, then their
variable parts in order, then the message bytes (whatever is left of the body)::

    CALL    (transport -> engine)  CALL_HEAD  method peer metadata... auth... request
    CANCEL  (transport -> engine)  empty: stop the call (its caller went away)
    REPLY   (engine -> transport)  REPLY_HEAD details initial... trailing... response
    HEADERS (engine -> transport)  COUNT initial...: a stream's initial metadata
    MESSAGE (engine -> transport)  one of a stream's responses
    CREDIT  (transport -> engine)  COUNT: response bytes of a stream the caller has taken

A call to a method whose responses stream (one request, any number of responses) is a
CALL whose head gives a window (0 for a unary call); its responses come as MESSAGE frames
(after a HEADERS frame, when it has initial metadata) and its status as the REPLY that ends
it. The engine sends no more than that window of response bytes (each message counted with
its frame head) beyond what the transport has given back with CREDIT; the transport gives
credit each time half the window has gone on to its caller, so the two sides cannot
disagree about it.

A metadata entry is ``ENTRY`` (binary value?, key length, value length), the key, the
value; binary values (keys ending in ``-bin``) stay bytes, others are UTF-8 text. An
``auth`` entry is a property of the caller's ``auth_context`` (always bytes).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

HEAD = struct.Struct("<IBI")
"""body length (u32), kind (u8), call id (u32)."""
CALL_HEAD = struct.Struct("<dHHHHI")
"""timeout in seconds (f64, NaN: none), method, peer (byte lengths), metadata and auth
entry counts, and the window of a call whose responses stream (0: a unary call)."""
REPLY_HEAD = struct.Struct("<BBIHH")
"""status code, has a response (0/1), details length, initial and trailing entry counts."""
COUNT = struct.Struct("<I")
"""An entry count (HEADERS) or a number of bytes (CREDIT)."""
ENTRY = struct.Struct("<BHI")

CALL = 1
CANCEL = 2
REPLY = 3
CALL_SHARED = 4
"""A CALL whose request is in shared memory: the message bytes are its name (``shm``)."""
HEADERS = 5
MESSAGE = 6
CREDIT = 7

MAX_CALL_ID = 2**32 - 1

Metadata = tuple[tuple[str, str | bytes], ...]

CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def too_large(size: int, limit: int) -> str:
    """grpc's words for a message over the limit (RESOURCE_EXHAUSTED)."""
    return f"Received message larger than max ({size} vs. {limit})"


class FrameError(Exception):
    """A frame that does not follow this format (a bug on the other side)."""


@dataclass(frozen=True, slots=True)
class CallFrame:
    """One call as the transport forwards it."""

    method: str
    request: bytes | memoryview
    metadata: Metadata = ()
    timeout_s: float | None = None
    peer: str = ""
    """The caller's address as the public port saw it (``ipv4:10.0.0.7:51234``)."""
    auth: tuple[tuple[str, bytes], ...] = ()
    """The caller's ``auth_context`` properties (TLS identity), one entry per value."""
    window: int = 0
    """A call whose responses stream: how many response bytes the engine may send beyond
    those the transport has given credit for. 0: a unary call."""


Buffer = bytes | bytearray | memoryview


def frame(kind: int, call_id: int, *parts: Buffer) -> bytes:
    """One frame: its head and the body made of ``parts``."""
    return b"".join(framed(kind, call_id, parts, b""))


def framed(
    kind: int, call_id: int, parts: Sequence[Buffer], message: Buffer
) -> tuple[bytes, Buffer]:
    """A frame as two pieces: its head with the body's ``parts`` joined, then ``message``
    (the request or response, not copied: written after the head as it is)."""
    length = sum(map(len, parts)) + len(message)
    return b"".join((HEAD.pack(length, kind, call_id), *parts)), message


def call_frame(call_id: int, call: CallFrame, shared: str | None = None) -> tuple[bytes, Buffer]:
    """The call's frame; with ``shared``, a CALL_SHARED frame naming the shared file that
    holds the request."""
    method = call.method.encode()
    peer = call.peer.encode()
    timeout = math.nan if call.timeout_s is None else call.timeout_s
    head = CALL_HEAD.pack(
        timeout, len(method), len(peer), len(call.metadata), len(call.auth), call.window
    )
    parts = (head, method, peer, *_entries(call.metadata), *_entries(call.auth))
    if shared is not None:
        return framed(CALL_SHARED, call_id, parts, shared.encode())
    return framed(CALL, call_id, parts, call.request)


def encode_call(call_id: int, call: CallFrame) -> bytes:
    return b"".join(call_frame(call_id, call))


def decode_call(body: bytes | bytearray) -> CallFrame:
    try:
        timeout, method_len, peer_len, n_metadata, n_auth, window = CALL_HEAD.unpack_from(body)
        at = CALL_HEAD.size
        method = bytes(body[at : at + method_len]).decode()
        at += method_len
        peer = bytes(body[at : at + peer_len]).decode()
        at += peer_len
        metadata, at = _read_entries(body, at, n_metadata)
        auth, at = _read_entries(body, at, n_auth)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"a call frame that cannot be read: {exc}") from exc
    if at > len(body):
        raise FrameError("a call frame shorter than its parts")
    # A large body (its own buffer) is not copied again: protobuf parses a view.
    request = body[at:] if isinstance(body, bytes) else memoryview(body)[at:]
    return CallFrame(
        method=method,
        request=request,
        metadata=metadata,
        timeout_s=None if math.isnan(timeout) else timeout,
        peer=peer,
        auth=tuple((key, v if isinstance(v, bytes) else v.encode()) for key, v in auth),
        window=window,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """What a unary call gave: its status, and the response when the status is OK."""

    code: grpc.StatusCode
    details: str
    response: bytes | None
    initial_metadata: Metadata
    trailing_metadata: Metadata


def reply_frame(call_id: int, reply: Reply) -> tuple[bytes, Buffer]:
    details = reply.details.encode()
    head = REPLY_HEAD.pack(
        reply.code.value[0],
        reply.response is not None,
        len(details),
        len(reply.initial_metadata),
        len(reply.trailing_metadata),
    )
    parts = (
        head,
        details,
        *_entries(reply.initial_metadata),
        *_entries(reply.trailing_metadata),
    )
    return framed(REPLY, call_id, parts, reply.response or b"")


def encode_reply(call_id: int, reply: Reply) -> bytes:
    return b"".join(reply_frame(call_id, reply))


def decode_reply(body: bytes | bytearray) -> Reply:
    try:
        code, has_response, details_len, n_initial, n_trailing = REPLY_HEAD.unpack_from(body)
        at = REPLY_HEAD.size
        details = bytes(body[at : at + details_len]).decode()
        at += details_len
        initial, at = _read_entries(body, at, n_initial)
        trailing, at = _read_entries(body, at, n_trailing)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"a reply frame that cannot be read: {exc}") from exc
    if at > len(body) or code not in CODES:
        raise FrameError("a reply frame shorter than its parts, or with an unknown status")
    return Reply(
        code=CODES[code],
        details=details,
        response=bytes(body[at:]) if has_response else None,
        initial_metadata=initial,
        trailing_metadata=trailing,
    )


def headers_frame(call_id: int, metadata: Metadata) -> bytes:
    return frame(HEADERS, call_id, COUNT.pack(len(metadata)), *_entries(metadata))


def decode_headers(body: bytes | bytearray) -> Metadata:
    try:
        (count,) = COUNT.unpack_from(body)
        metadata, at = _read_entries(body, COUNT.size, count)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"a headers frame that cannot be read: {exc}") from exc
    if at != len(body):
        raise FrameError("a headers frame whose length does not match its entries")
    return metadata


def credit_frame(call_id: int, nbytes: int) -> bytes:
    return frame(CREDIT, call_id, COUNT.pack(nbytes))


def decode_credit(body: bytes | bytearray) -> int:
    if len(body) != COUNT.size:
        raise FrameError(f"a credit frame of {len(body)} bytes")
    return int(COUNT.unpack(body)[0])


def _entries(entries: Sequence[tuple[str, str | bytes]]) -> Iterable[bytes]:
    for key, value in entries:
        raw_key = key.encode()
        binary = isinstance(value, bytes)
        raw = value if isinstance(value, bytes) else value.encode()
        yield ENTRY.pack(binary, len(raw_key), len(raw))
        yield raw_key
        yield raw


def _read_entries(body: bytes | bytearray, at: int, count: int) -> tuple[Metadata, int]:
    entries: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        binary, key_len, value_len = ENTRY.unpack_from(body, at)
        at += ENTRY.size
        key = bytes(body[at : at + key_len]).decode()
        at += key_len
        raw = bytes(body[at : at + value_len])
        at += value_len
        entries.append((key, raw if binary else raw.decode()))
    return tuple(entries), at


class FrameReader:
    """Cuts a byte stream into frames, for an ``asyncio.BufferedProtocol``: the transport
    reads straight into ``buffer()``. Small frames share one scratch buffer; a frame larger
    than that gets a buffer of its own size (never more than ``max_body_bytes``). A frame
    over ``max_body_bytes`` is reported (``Oversize``) and its body skipped unread into
    memory, so the connection goes on."""

    def __init__(self, max_body_bytes: int, scratch_bytes: int = 256 * 1024) -> None:
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray(scratch_bytes)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_filled = 0
        self._big_kind = 0
        self._big_id = 0
        self._skip = 0

    def buffer(self) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < len(self._buf) // 4:
            held = self._end - self._start
            self._buf[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        return self._view[self._end :]

    def feed(self, nbytes: int) -> list[tuple[int, int, bytes | bytearray | Oversize]]:
        """The frames completed by ``nbytes`` more bytes in ``buffer()``."""
        frames: list[tuple[int, int, bytes | bytearray | Oversize]] = []
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(self._big):
                return frames
            frames.append((self._big_kind, self._big_id, self._big))
            self._big = None
            return frames
        self._end += nbytes
        self._cut(frames)
        return frames

    def _cut(self, frames: list[tuple[int, int, bytes | bytearray | Oversize]]) -> None:
        buf, head = self._buf, HEAD.size
        while True:
            if self._skip:
                dropped = min(self._skip, self._end - self._start)
                self._start += dropped
                self._skip -= dropped
                if self._skip:
                    return
            held = self._end - self._start
            if held < head:
                return
            length, kind, call_id = HEAD.unpack_from(buf, self._start)
            if length > self.max_body_bytes:
                frames.append((kind, call_id, Oversize(length)))
                self._start += head
                self._skip = length
            elif held - head >= length:
                begin = self._start + head
                frames.append((kind, call_id, bytes(self._view[begin : begin + length])))
                self._start = begin + length
            elif head + length > len(buf):  # a big frame: read the rest into its own buffer
                big = bytearray(length)
                have = held - head
                big[:have] = self._view[self._start + head : self._end]
                self._big, self._big_filled, self._big_kind, self._big_id = big, have, kind, call_id
                self._start = self._end = 0
                return
            else:
                return


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame whose body (``size`` bytes) is over the reader's limit; it was skipped."""

    size: int
