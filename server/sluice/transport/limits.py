"""Bounds on the strings (and lists) a caller sends, checked before anything uses them.

Names, versions, ids and reasons reach error messages, logs, metric labels, histories and
file-system lookups: each has a length limit by field name, wherever it appears in a
request (nested messages included). Past it the call gets INVALID_ARGUMENT naming the
field and the limit. Free text with its own bound elsewhere (a prompt, bounded by the
model's context; an admin call's reason, ``admin.max_reason_chars``) and map keys (never
echoed) are not listed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sluice.domain import MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS
from sluice.errors import InvalidInputError

MAX_BYTES: dict[str, int] = {
    "model_name": 256,
    "name": 256,
    "repository_name": 256,
    "model_version": 64,
    "version": 64,
    "backend": 64,
    "datatype": 16,
    "id": 256,
    "request_id": 256,
    "stop_sequences": 256,
}
"""Longest value (UTF-8 bytes) of string fields with these names, in any request message."""

MAX_ITEMS: dict[str, int] = {
    "inputs": 1024,
    "outputs": 1024,
    "raw_input_contents": 1024,
    "parameters": 256,
}
"""Most entries of repeated and map fields with these names, in any request message (what
a request is converted into is proportional to them, on the event loop)."""

PROMPT_MESSAGE_ROOM_BYTES = 16 * 1024
"""What a request message that carries a prompt may hold besides the prompt: its names and
ids, sampling scalars, stop sequences and stop token ids, each within its bound, with
their tags and lengths (about 7 KiB at most), rounded up."""

MAX_REQUEST_ID_CHARS = 128
"""Longest ``x-request-id`` a caller may send (printable ASCII)."""

_Check = Callable[[Message], None]


def check_strings(message: Message) -> None:
    """Raise ``InvalidInputError`` when a bounded string field of ``message`` is too long, or
    a bounded repeated field has too many entries."""
    _checker(message.DESCRIPTOR)(message)


def valid_request_id(value: str) -> bool:
    """A caller's request id is echoed in trailers and logs: short, printable ASCII."""
    return len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()


@cache
def _checker(descriptor: Descriptor) -> _Check:
    """The checks for one message type, worked out once from its descriptor."""
    strings = [
        (field.name, MAX_BYTES[field.name], field.is_repeated)
        for field in descriptor.fields
        if field.type == FieldDescriptor.TYPE_STRING and field.name in MAX_BYTES
    ]
    counted = [
        (field.name, MAX_ITEMS[field.name])
        for field in descriptor.fields
        if field.is_repeated and field.name in MAX_ITEMS
    ]
    nested = [
        (field.name, field.is_repeated, message_type)
        for field, message_type in _message_fields(descriptor)
        if not message_type.GetOptions().map_entry and _has_bounded_strings(message_type, set())
    ]

    def check(message: Message) -> None:
        for name, most in counted:
            items = len(getattr(message, name))
            if items > most:
                raise InvalidInputError(
                    f"field '{name}' of {descriptor.name} has {items} entries; at most {most} "
                    "are allowed"
                )
        for name, limit, repeated in strings:
            value: Any = getattr(message, name)
            for text in value if repeated else (value,):
                if 4 * len(text) > limit:  # else within it in any encoding of 4 bytes or less
                    _check_length(descriptor, name, text, limit)
        for name, repeated, message_type in nested:
            _check_nested(message, name, repeated, message_type)

    return check


def _check_nested(message: Message, name: str, repeated: bool, descriptor: Descriptor) -> None:
    if repeated:
        items = getattr(message, name)
        if items:
            check_item = _checker(descriptor)
            for item in items:
                check_item(item)
    elif message.HasField(name):
        _checker(descriptor)(getattr(message, name))


def _has_bounded_strings(descriptor: Descriptor, seen: set[str]) -> bool:
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    if any(
        f.type == FieldDescriptor.TYPE_STRING and f.name in MAX_BYTES for f in descriptor.fields
    ):
        return True
    return any(_has_bounded_strings(m, seen) for _, m in _message_fields(descriptor))


def _message_fields(descriptor: Descriptor) -> list[tuple[FieldDescriptor, Descriptor]]:
    return [
        (field, field.message_type)
        for field in descriptor.fields
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None
    ]


def _check_length(descriptor: Descriptor, name: str, text: str, limit: int) -> None:
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > limit:
        raise InvalidInputError(
            f"field '{name}' of {descriptor.name} has {size} bytes; at most {limit} are "
            f"allowed (it starts {text[:40]!r})"
        )


def _prompt_message_room() -> int:
    """The most the bounded fields beside a prompt can take on the wire (field tags and
    length prefixes at most 6 bytes each)."""
    names = MAX_BYTES["model_name"] + MAX_BYTES["model_version"] + MAX_BYTES["request_id"]
    stops = MAX_STOP_SEQUENCES * (MAX_BYTES["stop_sequences"] + 6)
    token_ids = MAX_STOP_TOKEN_IDS * 5 + 6  # packed varints of at most 32 bits
    scalars = 8 * 12  # max_new_tokens, temperature, top_k, top_p, seed, penalty; tags
    nesting = 4 * 6  # the messages the prompt's request is nested in
    return names + 3 * 6 + stops + token_ids + scalars + nesting


assert _prompt_message_room() <= PROMPT_MESSAGE_ROOM_BYTES
