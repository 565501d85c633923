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


@dataclass(frozen=True, slots=True)
class LatencyGuardrail:
    """A version's latency guardrail: while its recent p95 is over ``guardrail_ms`` it is
    ``tripped`` and calls prefer the next candidate of its chain."""

    guardrail_ms: float
    tripped: bool
    #: Recent p95 latency (0 with no calls in the window) and the calls it is made of.
    p95_ms: float
    samples: int
    #: Calls slower than the guardrail since the version was loaded (soft failures).
    slow_calls: int


@dataclass(frozen=True, slots=True)
class ModelVersionStatus:
    """One model version as sluice.v1.ModelService sees it."""

    name: str
    version: str
    #: "READY" or "UNAVAILABLE".
    state: str
    reason: str
    #: Backend and capability-ladder rung that serve it, why, and on which device.
    backend: str
    backend_rung: str
    backend_reason: str
    device: str
    #: "CLOSED", "HALF_OPEN" or "OPEN".
    breaker_state: str
    #: Where calls go when it fails, in order ("model" or "model/version").
    fallbacks: list[str]
    #: This version answers calls that name no version.
    serving: bool = False
    #: Its latency guardrail (None: its model has none).
    latency_guardrail: LatencyGuardrail | None = None


@dataclass(frozen=True, slots=True)
class TokenCount:
    #: Tokens the prompt takes (exactly what a generation would see).
    token_count: int
    #: Longest sequence (prompt and generated tokens) the model takes.
    max_context: int


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed piece of a generation; the chunks' texts joined are the whole output."""

    text: str
    token_ids: list[int]
    #: "stop" or "length" on the last chunk; None before it.
    finish_reason: str | None
    #: Set on the last chunk only.
    usage: Usage | None
    #: The model and version serving the generation (another one after a fallback).
    model: str
    version: str
    #: Why another model serves the call; "" when the requested one does.
    fallback_reason: str


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """A whole generation: its chunks joined."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    model: str
    version: str

    @classmethod
    def join(cls, chunks: list[GenerateChunk]) -> GenerateResult:
        last = chunks[-1] if chunks else None
        return cls(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            finish_reason=last.finish_reason if last else None,
            usage=last.usage if last else None,
            model=last.model if last else "",
            version=last.version if last else "",
        )


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change to what a model serves (sluice.v1.ModelService/GetModelHistory)."""

    time: str
    #: load, unload, promote, rollback, load_failed.
    action: str
    from_version: str
    to_version: str
    who: str
    reason: str
