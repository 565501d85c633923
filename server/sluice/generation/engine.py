"""The generation engine's interface: what the rest of the server may do with the thing
that runs a model's generations (the continuous batcher, or a wrapper around it).

An engine is started once on the event loop, encodes prompts exactly as its model sees
them, takes generations (``submit``) and hands each one's chunks back through a
``TokenStream``, and is closed when its model version unloads. Nothing outside the
generation backend (``executors/causal_lm.py``) knows which class implements it.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from sluice.domain import Chunk, FinishReason, SamplingParams
from sluice.errors import ContextOverflowError
from sluice.priority import Priorities


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_running_sequences: int
    max_tokens_in_flight: int
    max_waiting: int
    max_buffered_chunks: int
    pushback_ms: int
    priorities: Priorities = field(default_factory=Priorities)
    """Which waiting generation joins first (by level, then age; aged ones first)."""


@dataclass(slots=True)
class SchedulerStats:
    """Counters of what an engine did, written by its thread (read anywhere: plain ints)."""

    prefills: int = 0
    decode_steps: int = 0
    """Forward passes that decoded one token for each of the running sequences."""
    tokens_generated: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    max_steps_after_cancel: int = 0
    """Most decode steps any sequence took part in after its caller cancelled (at most the
    one that was running when the cancel came)."""
    running: int = 0
    waiting: int = 0
    _cancel_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_cancelled(self) -> None:
        """One more cancelled generation (counted by the engine's thread, and on the event
        loop for generations a fault wrapper held back from the engine)."""
        with self._cancel_lock:
            self.cancelled += 1


class TokenStream(abc.ABC):
    """One generation's chunks, in order. Iterate it; leaving it early (``cancel``,
    ``aclose``, or the ``async with`` block) ends the generation at the engine's next step.
    An error ends the iteration by raising it."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None

    def __aiter__(self) -> TokenStream:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Chunk: ...

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop generating (the sequence leaves at the next step boundary)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop generating unless the generation has already ended."""

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class GenerationEngine(abc.ABC):
    """Runs every generation of one model version."""

    name: str
    """``model/version``, for errors and logs."""

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """Tokens a sequence may hold: its prompt plus everything it generates."""

    @property
    @abc.abstractmethod
    def max_prompt_bytes(self) -> int:
        """The most UTF-8 bytes a prompt may have: a longer one cannot fit in the context,
        whatever its text."""

    @property
    @abc.abstractmethod
    def stats(self) -> SchedulerStats: ...

    @abc.abstractmethod
    def start(self) -> None:
        """Start running generations (on the running event loop)."""

    @abc.abstractmethod
    async def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, exactly as the model will see them (a prompt too long
        for the context in bytes is refused before any tokenizing)."""

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """``ContextOverflowError`` when the prompt and ``max_new_tokens`` cannot fit."""
        if prompt_tokens + max_new_tokens > self.max_context:
            raise ContextOverflowError(
                model=self.name,
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                max_context=self.max_context,
            )

    @abc.abstractmethod
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None,
        priority: int = 0,
    ) -> TokenStream:
        """Queue a generation (``deadline`` on the engine's clock) at ``priority`` (0: the
        default level); its chunks come through the returned stream."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine; generations still running end with UNAVAILABLE."""
