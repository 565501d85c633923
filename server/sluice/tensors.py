"""Tensors a model version accepts and returns, and the validation of a request's inputs.

Every check runs against the model's spec before anything is allocated: names, datatypes,
ranks, dimensions, element counts and byte sizes. Numeric raw contents become zero-copy
numpy views of the request's bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.domain import InferRequest, InputTensor
from sluice.errors import InvalidInputError
from sluice_client.tensors import DATATYPES, WireFormatError, element_count, from_raw

Array = npt.NDArray[Any]
#: Typed contents without numpy support are copied this many elements per C call (about
#: a millisecond of work).
TYPED_CHUNK_ELEMENTS = 16384
#: How long a worker thread copying typed contents pauses between chunks, so that the event
#: loop takes the GIL at once instead of after the interpreter's switch interval.
GIL_PAUSE_S = 0.0001


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: ``dims`` excludes the batch dimension; -1 is variable."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    """An input a request may leave out."""

    def shape(self, batched: bool) -> tuple[int, ...]:
        """The shape as the protocol reports it: ``[-1] + dims`` when the model batches."""
        return (-1, *self.dims) if batched else self.dims


@dataclass(frozen=True, slots=True)
class IOSpec:
    """What a model version accepts and returns."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


BYTES_ELEMENT_COST = 256
"""Memory one BYTES element costs on its way through the server beyond its contents: a
Python object and the array's pointer to it when decoded, the backend's own string, and,
for a model that answers with as many elements (the common case, and what an identity
does), the same again for the reply. What a call is weighed for each element it sends."""


@dataclass(frozen=True, slots=True)
class InputCheck:
    """What validating a request's inputs learned, before anything is decoded."""

    rows: int
    """Batch rows (1 for a model without a batch dimension)."""
    decoded_bytes: int
    """Memory decoding will allocate beyond the request itself (BYTES elements)."""
    payload_bytes: int
    """Bytes of tensor contents the request carries."""


def check_inputs(request: InferRequest, io: IOSpec) -> InputCheck:
    """Validate ``request.inputs`` against ``io`` (names, datatypes, shapes, batch sizes,
    which inputs are there) without decoding anything."""
    specs = {spec.name: spec for spec in io.inputs}
    seen: set[str] = set()
    batch: int | None = None
    decoded = payload = 0
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input '{tensor.name}' for model '{request.model}'; "
                f"expected inputs: {', '.join(sorted(specs))}"
            )
        if tensor.name in seen:
            raise InvalidInputError(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
        _check_shape(tensor, spec, io)
        _check_contents(tensor)
        if io.batched:
            if batch is not None and tensor.shape[0] != batch:
                raise InvalidInputError(
                    f"input '{tensor.name}' has batch size {tensor.shape[0]} but another "
                    f"input has {batch}; all inputs must share the batch dimension"
                )
            batch = tensor.shape[0]
        if tensor.datatype == "BYTES":
            decoded += element_count(tensor.shape) * BYTES_ELEMENT_COST
        payload += len(tensor.raw) if tensor.raw is not None else 4 * len(tensor.values or ())
    missing = sorted(name for name, spec in specs.items() if not spec.optional)
    missing = [name for name in missing if name not in seen]
    if missing:
        raise InvalidInputError(
            f"model '{request.model}' needs input(s) {', '.join(missing)} that the request "
            "does not carry"
        )
    return InputCheck(rows=batch or 1, decoded_bytes=decoded, payload_bytes=payload)


def decode_checked(request: InferRequest) -> dict[str, Array]:
    """Decode inputs that ``check_inputs`` has validated into arrays (numeric raw contents
    as zero-copy views of the request's bytes)."""
    return {tensor.name: _decode(tensor) for tensor in request.inputs}


def decode_inputs(request: InferRequest, io: IOSpec) -> dict[str, Array]:
    """Validate ``request.inputs`` against ``io`` and decode them into arrays."""
    check_inputs(request, io)
    return decode_checked(request)


def check_requested_outputs(request: InferRequest, io: IOSpec) -> list[str]:
    """The output names to return, in order: the requested ones, or all of them."""
    known = [spec.name for spec in io.outputs]
    if not request.outputs:
        return known
    unknown = [name for name in request.outputs if name not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown output(s) {', '.join(unknown[:8])} requested from model "
            f"'{request.model}'; it has: {', '.join(known)}"
        )
    if len(set(request.outputs)) != len(request.outputs):
        repeated = sorted({name for name in request.outputs if request.outputs.count(name) > 1})
        raise InvalidInputError(
            f"output(s) {', '.join(repeated)} requested more than once from model "
            f"'{request.model}'; name each output at most once"
        )
    return list(request.outputs)


def expected_reply_bytes(io: IOSpec, wanted: list[str], rows: int) -> int:
    """The reply's tensor bytes as far as the output shapes tell before the model runs
    (variable dimensions and BYTES elements count as nothing: only known sizes are
    weighed before running; the reply is measured again once it exists)."""
    specs = {spec.name: spec for spec in io.outputs}
    total = 0
    for name in wanted:
        spec = specs[name]
        itemsize = DATATYPES[spec.datatype].itemsize
        if itemsize == 0 or any(dim < 0 for dim in spec.dims):
            continue
        total += element_count(spec.dims) * itemsize * (rows if io.batched else 1)
    return total


def reply_size(outputs: Iterable[Array]) -> int:
    """Bytes the outputs take on the wire (a BYTES element: its length and 4 bytes)."""
    total = 0
    for array in outputs:
        if array.dtype == object:
            total += 4 * array.size + sum(map(len, array.reshape(-1)))
        else:
            total += array.nbytes
    return total


def _check_shape(tensor: InputTensor, spec: TensorSpec, io: IOSpec) -> None:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input '{tensor.name}' has datatype {tensor.datatype or '(none)'} but the model "
            f"expects {spec.datatype}"
        )
    expected = spec.shape(io.batched)
    if len(tensor.shape) != len(expected):
        raise InvalidInputError(
            f"input '{tensor.name}' has shape {list(tensor.shape)} (rank {len(tensor.shape)}) "
            f"but the model expects rank {len(expected)}: {list(expected)}"
        )
    for axis, (got, want) in enumerate(zip(tensor.shape, expected, strict=True)):
        if got < 0 or (want >= 0 and got != want):
            raise InvalidInputError(
                f"input '{tensor.name}' has shape {list(tensor.shape)}; dimension {axis} "
                f"must be {want if want >= 0 else 'a non-negative size'}, got {got} "
                f"(expected shape {list(expected)}, -1 = any)"
            )
    if io.batched and not 1 <= tensor.shape[0] <= io.max_batch_size:
        raise InvalidInputError(
            f"input '{tensor.name}' has batch size {tensor.shape[0]}; this model takes "
            f"1 to {io.max_batch_size} per request"
        )


def _check_contents(tensor: InputTensor) -> None:
    """The contents hold what the shape says (checked before anything is decoded, so a
    claimed shape never drives an allocation the bytes do not back)."""
    count = element_count(tensor.shape)
    if tensor.raw is not None:
        if tensor.values:
            raise InvalidInputError(
                f"input '{tensor.name}' carries both raw and typed contents; send one of them"
            )
        itemsize = DATATYPES[tensor.datatype].itemsize
        if itemsize and len(tensor.raw) != count * itemsize:
            raise InvalidInputError(
                f"input '{tensor.name}': {len(tensor.raw)} bytes do not hold {count} "
                f"{tensor.datatype} elements ({count * itemsize} bytes expected for shape "
                f"{list(tensor.shape)})"
            )
        if not itemsize and len(tensor.raw) < 4 * count:
            raise InvalidInputError(
                f"input '{tensor.name}': {len(tensor.raw)} bytes of BYTES data cannot hold "
                f"{count} elements (each needs a 4-byte length) for shape {list(tensor.shape)}"
            )
        return
    if tensor.datatype in ("FP16", "BF16"):
        raise InvalidInputError(
            f"input '{tensor.name}' is {tensor.datatype}, which has no typed contents field; "
            "send it as raw_input_contents"
        )
    values = len(tensor.values) if tensor.values is not None else 0
    if values != count:
        raise InvalidInputError(
            f"input '{tensor.name}' has {values} values but shape "
            f"{list(tensor.shape)} holds {count}"
        )


def _decode(tensor: InputTensor) -> Array:
    if tensor.raw is not None:
        try:
            return from_raw(tensor.raw, tensor.datatype, tensor.shape)
        except WireFormatError as exc:
            raise InvalidInputError(f"input '{tensor.name}': {exc}") from exc
    values = tensor.values if tensor.values is not None else ()
    if tensor.datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out.reshape(tensor.shape)
    try:
        array = _typed_array(values, DATATYPES[tensor.datatype].numpy)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(
            f"input '{tensor.name}' has values that do not fit {tensor.datatype}: {exc}"
        ) from exc
    return array.reshape(tensor.shape)


def _typed_array(values: Sequence[Any], dtype: npt.DTypeLike) -> Array:
    """A numpy copy of typed contents (a repeated protobuf field of numbers).

    protobuf 7's repeated fields copy themselves into an array in one C call. protobuf 6's
    give up their values one Python number at a time (about 70 ns each): they are copied in
    chunks, each one C call, with no float64 copy on the way. Off the event loop, the thread
    pauses between chunks. Without the pause, every time the loop gave the GIL up (to poll,
    to send) it waited the switch interval, 5 ms, to get it back: one request with 4M
    typed floats slowed every other call on the loop, health checks too, by 100 ms and
    more. With it, the loop waits at most about a chunk.
    """
    if hasattr(values, "__array__"):
        return np.asarray(values, dtype=dtype)
    out = np.empty(len(values), dtype=dtype)
    items = iter(values)
    pause = len(out) > TYPED_CHUNK_ELEMENTS and not _on_event_loop()
    for start in range(0, len(out), TYPED_CHUNK_ELEMENTS):
        if pause and start:
            time.sleep(GIL_PAUSE_S)
        count = min(TYPED_CHUNK_ELEMENTS, len(out) - start)
        out[start : start + count] = np.fromiter(
            itertools.islice(items, count), dtype=dtype, count=count
        )
    return out


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def probe_inputs(io: IOSpec) -> dict[str, Array]:
    """Inputs for a test inference: zeros (empty BYTES), one row, variable dimensions of 1;
    optional inputs left out."""
    inputs: dict[str, Array] = {}
    for spec in io.inputs:
        if spec.optional:
            continue
        shape = tuple(1 if dim < 0 else dim for dim in spec.shape(io.batched))
        if spec.datatype == "BYTES":
            array = np.empty(shape, dtype=object)
            array.fill(b"")
        else:
            array = np.zeros(shape, dtype=DATATYPES[spec.datatype].numpy)
        inputs[spec.name] = array
    return inputs
