"""What the client returns: plain dataclasses and numpy arrays, never protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    #: -1 marks a variable dimension.
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    """One row of the repository index: a model version and its state."""

    name: str
    #: "" for a model with no loaded version.
    version: str
    #: "READY" or "UNAVAILABLE".
    state: str
    #: Why the model or version is not ready ("" when it is).
    reason: str


@dataclass(frozen=True, slots=True)
class DurationStat:
    """How many times something happened and the nanoseconds it took in all."""

    count: int
    ns: int


@dataclass(frozen=True, slots=True)
class InferenceStats:
    success: DurationStat
    fail: DurationStat
    queue: DurationStat
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat


@dataclass(frozen=True, slots=True)
class BatchStats:
    batch_size: int
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    name: str
    version: str
    #: Milliseconds since the epoch of the last inference (0: none yet).
    last_inference_ms: int
    inference_count: int
    execution_count: int
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]


@dataclass(frozen=True, slots=True)
class InferResult:
    """One inference answer. Numeric outputs are read-only views of the response bytes
    (``.copy()`` one to change it); BYTES outputs are object arrays of ``bytes``."""

    model: str
    version: str
    id: str
    outputs: dict[str, npt.NDArray[Any]]
    #: Each output's OIP datatype (BF16 arrives as uint16 words, so the dtype cannot tell).
    datatypes: dict[str, str]
