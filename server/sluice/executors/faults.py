"""Fault injection: an executor wrapper that fails, hangs or slows down on demand.

Configured per model (``faults:`` in its config.yaml, applied on load or reload), for tests
and for game days: it exercises breakers, retries, fallbacks and deadlines against a real
running server. A fault hits a batch with ``probability``; ``seed`` makes the draw
repeatable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from sluice.errors import ExecutorDeadError, ExecutorError
from sluice.executors.base import DeclaredTensor, Executor
from sluice.tensors import Array


class FaultConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    mode: Literal["none", "fail", "hang", "slow", "dead"] = "none"
    """fail: a transient backend error; hang: never answers (until the call gives up);
    slow: answers after ``delay_ms``; dead: the backend reports it can run nothing more."""
    probability: float = Field(1.0, ge=0, le=1)
    """Share of batches the fault hits."""
    delay_ms: float = Field(0.0, ge=0)
    """Added latency for ``slow``."""
    backends: list[str] = []
    """Backends (or ladder rungs) the fault applies to; empty: all of the model's."""
    seed: int | None = None
    """Seed for the draw (None: a fresh random sequence)."""
    after_tokens: int = Field(0, ge=0)
    """Generation models: a hit generation fails (or hangs) once it has made this many
    tokens (0: before its first). The draw is per generation, not per decode step."""


class FaultyExecutor(Executor):
    """Wraps a real executor; batches the fault misses run on it unchanged."""

    backend: ClassVar[str] = "faulty"

    def __init__(self, inner: Executor, config: FaultConfig) -> None:
        self._inner = inner
        self._config = config
        self._random = random.Random(config.seed)
        self.backend = inner.backend  # type: ignore[misc]  # reports the wrapped backend

    @property
    def inputs(self) -> Sequence[DeclaredTensor]:
        return self._inner.inputs

    @property
    def outputs(self) -> Sequence[DeclaredTensor]:
        return self._inner.outputs

    @property
    def device(self) -> str:
        return self._inner.device

    async def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        mode = self._config.mode
        if mode != "none" and self._random.random() < self._config.probability:
            if mode == "fail":
                raise ExecutorError("injected fault: the backend failed this batch")
            if mode == "dead":
                raise ExecutorDeadError("injected fault: the backend is dead")
            if mode == "hang":
                await asyncio.Event().wait()  # until the caller gives up and cancels
            await asyncio.sleep(self._config.delay_ms / 1000)
        return await self._inner.run(inputs)

    def probe_inputs(self) -> dict[str, Array] | None:
        return self._inner.probe_inputs()

    async def close(self) -> None:
        await self._inner.close()
