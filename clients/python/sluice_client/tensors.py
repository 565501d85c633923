"""Open Inference Protocol tensor codec: datatype table and numpy <-> wire bytes.

Shared by the server and the clients so both sides agree on one encoding: numbers are
little-endian and row-major; BYTES elements are a 4-byte little-endian length followed by
the bytes; BF16 travels as raw 2-byte words (the high half of a float32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Datatype:
    """One OIP datatype: its wire name, numpy dtype and bytes per element (0 = variable)."""

    name: str
    numpy: np.dtype[Any]
    itemsize: int


def _dt(name: str, numpy_name: str, itemsize: int) -> Datatype:
    return Datatype(name, np.dtype(numpy_name), itemsize)


DATATYPES: Final[dict[str, Datatype]] = {
    d.name: d
    for d in (
        _dt("BOOL", "bool", 1),
        _dt("UINT8", "<u1", 1),
        _dt("UINT16", "<u2", 2),
        _dt("UINT32", "<u4", 4),
        _dt("UINT64", "<u8", 8),
        _dt("INT8", "<i1", 1),
        _dt("INT16", "<i2", 2),
        _dt("INT32", "<i4", 4),
        _dt("INT64", "<i8", 8),
        _dt("FP16", "<f2", 2),
        _dt("FP32", "<f4", 4),
        _dt("FP64", "<f8", 8),
        # BF16 has no numpy type: the words are carried as uint16 and never reinterpreted.
        _dt("BF16", "<u2", 2),
        _dt("BYTES", "object", 0),
    )
}

_BY_KIND: Final[dict[tuple[str, int], str]] = {
    (d.numpy.kind, d.numpy.itemsize): d.name
    for d in DATATYPES.values()
    if d.name not in ("BF16", "BYTES")
}

_LENGTH: Final = struct.Struct("<I")


class WireFormatError(ValueError):
    """Bytes that do not decode as the datatype and shape they claim."""


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    """The OIP datatype name for a numpy array (object / bytes / str arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise WireFormatError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Length-prefix every element of a BYTES tensor, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> npt.NDArray[np.object_]:
    """Split a length-prefixed BYTES buffer into exactly ``count`` elements."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise WireFormatError(
                f"BYTES data ends after {index} of {count} elements (a 4-byte length is missing)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise WireFormatError(
                f"BYTES element {index} claims {length} bytes but only {len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise WireFormatError(
            f"BYTES data has {len(view) - offset} bytes left over after {count} elements"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def to_raw(array: npt.NDArray[np.generic], datatype: str) -> bytes:
    """Encode an array as OIP raw contents for ``datatype``."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    dtype = DATATYPES[datatype].numpy
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_raw(buffer: bytes, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    """Decode raw contents; numeric types are a zero-copy read-only view of ``buffer``."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buffer, count).reshape(shape)
    spec = DATATYPES[datatype]
    if len(buffer) != count * spec.itemsize:
        raise WireFormatError(
            f"{len(buffer)} bytes do not hold {count} {datatype} elements "
            f"({count * spec.itemsize} bytes expected for shape {list(shape)})"
        )
    return np.frombuffer(buffer, dtype=spec.numpy).reshape(shape)
