"""How many bytes a message this server made takes on the wire, known without encoding it.

upb's ``ByteSize`` encodes the whole message to count it: for a 16 MiB reply that is about
50 ms of C work that holds the GIL, on the event loop if it is asked there (every other
call, health checks included, waits behind it). ``encode_off_loop`` must decide, on the
loop, whether a reply is encoded there or in a worker thread: ``size_bound`` works the size
out from the fields instead. It bounds the size from above (a number encoded as a varint
is counted at its widest, ten bytes; a length prefix at five) and stops early: once the
count passes ``above``, or once it has visited ``MAX_WALKED_ITEMS`` fields and entries, it
answers None ("may be larger": encoded in a thread), so what it costs on the loop is
bounded whatever the message holds. It counts the fields the schema declares, not unknown
fields a caller added, so it sizes the messages this server makes, never a caller's: a
request's size is the length it arrived with (``received_message_bytes`` for a stream's
messages). A string or bytes value is copied to be measured (protobuf gives no length
without the value), so a servicer that knows its reply is large encodes it itself, in a
worker thread, and ``encode_off_loop`` passes its bytes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

MAX_WALKED_ITEMS = 512
"""Fields and entries of repeated and map fields visited before the answer is "may be
larger" (a reply with more is encoded off the event loop)."""

OFF_LOOP_BYTES = 1024 * 1024
"""Messages that may be larger than this are sized (and encoded) in a worker thread."""

_VARINT = 10
_PREFIX = 5  # a length prefix, at its widest for any length under 4 GiB
_FIXED_WIDTH = {
    FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_BOOL: 1,
}
_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


Serializer = Callable[[Any], bytes]

received_message_bytes: ContextVar[int] = ContextVar("received_message_bytes", default=-1)
"""The encoded length of the request message a stream handler took last, as it arrived
(set by the interceptors' ``decoded_stream`` in the reading task; -1: none)."""


class _MayBeLarger(Exception):
    """The walk stopped: the message may be larger than asked about."""


def size_bound(message: Message, *, above: int) -> int | None:
    """An upper bound on ``message``'s encoded size, or None when the message may be larger
    than ``above`` bytes (or has too many entries to count cheaply)."""
    try:
        return _Walk(above).message(message)
    except _MayBeLarger:
        return None


async def encode_off_loop(serialize: Serializer, message: Any) -> bytes:
    """A response's bytes (a servicer may give them, encoded already), made in a worker
    thread when the message may be large: sized from its fields (``ByteSize`` encodes)."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, Message) and size_bound(message, above=OFF_LOOP_BYTES) is None:
        return await asyncio.to_thread(serialize, message)
    return serialize(message)


class _Walk:
    __slots__ = ("items", "left")

    def __init__(self, above: int) -> None:
        self.left = above
        self.items = MAX_WALKED_ITEMS

    def spend(self, size: int) -> int:
        self.left -= size
        if self.left < 0:
            raise _MayBeLarger
        return size

    def count(self, items: int) -> None:
        self.items -= items
        if self.items < 0:
            raise _MayBeLarger

    def message(self, message: Message) -> int:
        total = 0
        fields = message.ListFields()
        self.count(len(fields))
        for field, value in fields:
            total += self.field(field, value)
        return total

    def field(self, field: FieldDescriptor, value: Any) -> int:
        tag = _tag_size(field)
        if _is_map(field):
            return self.map(field, value, tag)
        if not field.is_repeated:
            return self.spend(tag) + self.single(field, value)
        width = _FIXED_WIDTH.get(field.type)
        if field.type in _LENGTH_DELIMITED or field.type == FieldDescriptor.TYPE_MESSAGE:
            self.count(len(value))
            return self.spend(tag * len(value)) + sum(self.single(field, item) for item in value)
        return self.spend(tag + _PREFIX + len(value) * (width or _VARINT))  # packed

    def single(self, field: FieldDescriptor, value: Any) -> int:
        """One value's size, without its tag."""
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            self.spend(_PREFIX)
            return _PREFIX + self.message(value)
        if field.type == FieldDescriptor.TYPE_STRING:
            return self.spend(_PREFIX + (len(value) if value.isascii() else 4 * len(value)))
        if field.type == FieldDescriptor.TYPE_BYTES:
            return self.spend(_PREFIX + len(value))
        return self.spend(_FIXED_WIDTH.get(field.type, _VARINT))

    def map(self, field: FieldDescriptor, value: Any, tag: int) -> int:
        self.count(len(value))
        key_field, value_field = _entry_fields(field.message_type)
        total = 0
        for key, item in value.items():
            total += self.spend(tag + _PREFIX + 2)  # the entry's tag, length, and two field tags
            total += self.single(key_field, key) + self.single(value_field, item)
        return total


@cache
def _tag_size(field: FieldDescriptor) -> int:
    tag = field.number << 3
    size = 1
    while tag >= 0x80:
        tag >>= 7
        size += 1
    return size


@cache
def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.is_repeated
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


@cache
def _entry_fields(entry: Descriptor) -> tuple[FieldDescriptor, FieldDescriptor]:
    return entry.fields_by_name["key"], entry.fields_by_name["value"]
