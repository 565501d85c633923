"""Fault injection: wrappers that make a backend fail, hang or slow down on demand.

Configured per model (``faults:`` in its config.yaml, applied on load or reload), for tests
and for game days: it exercises breakers, retries, fallbacks and deadlines against a real
running server. ``FaultyExecutor`` wraps a tensor backend's executor: a fault hits a batch.
``FaultyEngine`` wraps a generation backend's engine: a fault hits a generation once it has
made ``after_tokens`` tokens. Either draws with ``probability``; ``seed`` makes the draw
repeatable. What a fault misses runs on the wrapped backend unchanged.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import ClassVar

from sluice.domain import Chunk, FinishReason, SamplingParams
from sluice.errors import ExecutorDeadError, ExecutorError, InvalidInputError, SluiceError
from sluice.executors.base import DeclaredTensor, Executor, FaultConfig
from sluice.generation.engine import GenerationEngine, SchedulerStats, TokenStream
from sluice.tensors import Array


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
        if _draw(self._config, self._random):
            mode = self._config.mode
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


def _draw(config: FaultConfig, draw: random.Random) -> bool:
    """Whether the fault hits this batch or generation."""
    return config.mode != "none" and draw.random() < config.probability


class FaultyEngine(GenerationEngine):
    """Wraps a generation engine; a generation the fault hits fails (``fail``, ``dead``),
    stops making tokens (``hang``) or makes each later one ``delay_ms`` late (``slow``) once
    it has made ``after_tokens``. One that fails or hangs before its first token never
    reaches the engine."""

    def __init__(self, inner: GenerationEngine, config: FaultConfig) -> None:
        self._inner = inner
        self._config = config
        self._random = random.Random(config.seed)
        self.name = inner.name

    @property
    def max_context(self) -> int:
        return self._inner.max_context

    @property
    def max_prompt_bytes(self) -> int:
        return self._inner.max_prompt_bytes

    @property
    def stats(self) -> SchedulerStats:
        return self._inner.stats

    def start(self) -> None:
        self._inner.start()

    async def encode(self, prompt: str) -> list[int]:
        return await self._inner.encode(prompt)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None,
        priority: int = 0,
    ) -> TokenStream:
        if not _draw(self._config, self._random):
            return self._inner.submit(prompt_ids, params, deadline=deadline, priority=priority)
        if self._config.after_tokens == 0 and self._config.mode != "slow":
            # Hit before its first token: the engine never sees it.
            if not prompt_ids:
                raise InvalidInputError(
                    "the prompt is empty: send at least one token's worth of text"
                )
            self.check_fits(len(prompt_ids), params.max_new_tokens)
            return _FaultyStream(None, self._config, self.name, self.stats, len(prompt_ids))
        inner = self._inner.submit(prompt_ids, params, deadline=deadline, priority=priority)
        return _FaultyStream(inner, self._config, self.name, self.stats, len(prompt_ids))

    async def close(self) -> None:
        await self._inner.close()


class _FaultyStream(TokenStream):
    """A hit generation: the engine's chunks up to ``after_tokens``, then the fault."""

    def __init__(
        self,
        inner: TokenStream | None,
        config: FaultConfig,
        name: str,
        stats: SchedulerStats,
        prompt_tokens: int,
    ) -> None:
        self._inner = inner
        self._config = config
        self._name = name
        self._stats = stats
        self._ended = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        if self.completion_tokens >= self._config.after_tokens:
            await self._strike()
        assert self._inner is not None  # no stream before the first token: _strike raised
        chunk = await anext(self._inner)
        self.completion_tokens = self._inner.completion_tokens
        self.finish_reason = self._inner.finish_reason
        self._ended = chunk.finish_reason is not None
        return chunk

    async def _strike(self) -> None:
        """The fault, now that the generation has made ``after_tokens``: fail, hang until
        the caller gives up, or wait ``delay_ms`` before the next token."""
        mode = self._config.mode
        if mode == "slow":
            await asyncio.sleep(self._config.delay_ms / 1000)
            return
        self._stop_engine()
        if mode == "hang":
            await asyncio.Event().wait()  # until the caller gives up and cancels
        error: SluiceError = (
            ExecutorDeadError("injected fault: dead backend")
            if mode == "dead"
            else ExecutorError(f"injected fault: model {self._name} failed this generation")
        )
        self._ended = True
        raise error

    def _stop_engine(self) -> None:
        """The engine stops working on the generation (the fault took it over)."""
        if self._inner is not None:
            self._inner.cancel()

    def cancel(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.finish_reason = FinishReason.CANCELLED
        if self._inner is None:
            self._stats.count_cancelled()  # held back before the engine saw it
        else:
            self._inner.cancel()

    async def aclose(self) -> None:
        self.cancel()
