"""A cached answer as bytes, for the shared store: a length-prefixed JSON header (who
computed it; each output's name, datatype, shape and size) and the outputs' wire
encodings. Reading one back checks everything before it is used: the header's size and
types, every datatype, every shape against its bytes, and the whole entry against the
per-entry limit; anything else is ``ValueError``."""

from __future__ import annotations

import json
from typing import Any

from sluice.caching.lru import Cached, entry_bytes
from sluice.domain import OutputTensor
from sluice_client.tensors import DATATYPES, WireFormatError, from_raw, to_raw

MAX_HEADER_BYTES = 64 * 1024
_HEADER_LENGTH = 4


def encode(entry: Cached) -> bytes:
    contents = [to_raw(output.array, output.datatype) for output in entry.outputs]
    header = {
        "model": entry.model,
        "version": entry.version,
        "backend": entry.backend,
        "outputs": [
            {
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(output.array.shape),
                "size": len(raw),
            }
            for output, raw in zip(entry.outputs, contents, strict=True)
        ],
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([len(text).to_bytes(_HEADER_LENGTH, "little"), text, *contents])


def decode(blob: bytes, *, max_entry_bytes: int) -> Cached:
    """The entry ``blob`` holds (its arrays are read-only views of it)."""
    if len(blob) > max_entry_bytes + MAX_HEADER_BYTES + _HEADER_LENGTH:
        raise ValueError(f"{len(blob)} bytes: larger than any entry kept")
    length = int.from_bytes(blob[:_HEADER_LENGTH], "little")
    if not 0 < length <= min(MAX_HEADER_BYTES, len(blob) - _HEADER_LENGTH):
        raise ValueError(f"a header of {length} bytes")
    header = json.loads(blob[_HEADER_LENGTH : _HEADER_LENGTH + length])
    if not isinstance(header, dict) or not isinstance(header.get("outputs"), list):
        raise ValueError("no outputs in the header")
    names = [_text(header, key) for key in ("model", "version", "backend")]
    view = memoryview(blob)
    offset = _HEADER_LENGTH + length
    outputs = []
    for described in header["outputs"]:
        name, datatype, shape, size = _output(described)
        if offset + size > len(blob):
            raise ValueError(f"output '{name}' runs past the entry's end")
        try:
            array = from_raw(bytes(view[offset : offset + size]), datatype, shape)
        except WireFormatError as exc:
            raise ValueError(f"output '{name}': {exc}") from exc
        array.flags.writeable = False
        outputs.append(OutputTensor(name, datatype, array))
        offset += size
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} bytes after the last output")
    nbytes = entry_bytes(outputs)
    if nbytes > max_entry_bytes:
        raise ValueError(f"{nbytes} bytes: larger than cache.max_entry_bytes")
    return Cached(names[0], names[1], names[2], tuple(outputs), nbytes)


def _text(header: dict[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str):
        raise ValueError(f"no {key} in the header")
    return value


def _output(described: Any) -> tuple[str, str, tuple[int, ...], int]:
    if not isinstance(described, dict):
        raise ValueError("an output that is not an object")
    name, datatype = described.get("name"), described.get("datatype")
    shape, size = described.get("shape"), described.get("size")
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise ValueError("an output without a name or a known datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"output '{name}': a shape that is not non-negative sizes")
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"output '{name}': a size that is not a non-negative count")
    return name, datatype, tuple(shape), size
