"""Batch arithmetic: which requests can share a batch, how their inputs become one batch,
and how the batch's outputs become one answer per request.

Requests share a batch when their inputs have the same names, datatypes and shapes past
the batch dimension (their ``signature``). A batched model's inputs are concatenated along
the first dimension and its outputs sliced back by each request's rows; a model without a
batch dimension runs one request at a time, so its inputs and outputs pass through as they
are. Nothing here queues, times or runs anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sluice.errors import ExecutorError
from sluice.tensors import Array

Signature = tuple[object, ...]
"""What requests must share to run in one batch."""


def signature(inputs: Mapping[str, Array], *, batched: bool) -> Signature:
    """Input names, datatypes and shapes (past the batch dimension when batched)."""
    return tuple(
        (name, array.dtype.str, array.shape[1:] if batched else array.shape)
        for name, array in sorted(inputs.items())
    )


def rows(inputs: Mapping[str, Array], *, batched: bool) -> int:
    """Rows one request brings to a batch (1 without a batch dimension)."""
    return next(iter(inputs.values())).shape[0] if batched and inputs else 1


def merge(requests: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """One batch's inputs: each input of every request, concatenated in request order."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([inputs[name] for inputs in requests]) for name in requests[0]}


def check_rows(outputs: Mapping[str, Array], batch_rows: int, *, model: str) -> None:
    """A batched model must return every output with the batch's rows first; anything else
    is a backend fault (its rows cannot be handed back to their requests)."""
    wrong = [
        name for name, array in outputs.items() if array.ndim == 0 or array.shape[0] != batch_rows
    ]
    if wrong:
        raise ExecutorError(
            f"model {model} returned output(s) {', '.join(wrong)} whose first dimension is "
            f"not the batch size {batch_rows}"
        )


def split(outputs: dict[str, Array], request_rows: Sequence[int]) -> list[dict[str, Array]]:
    """Each request's outputs: its rows of every output (views, nothing copied)."""
    if len(request_rows) == 1:
        return [outputs]
    parts = []
    offset = 0
    for count in request_rows:
        stop = offset + count
        parts.append({name: array[offset:stop] for name, array in outputs.items()})
        offset = stop
    return parts
