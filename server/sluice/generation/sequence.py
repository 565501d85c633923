"""One generation inside the continuous batcher: the engine's record of it (``EngineSequence``)
and the caller's side of it (``Generation``, vLLM's per-request output collector).

The engine thread appends chunks (and finally an ``End``) to the sequence's outbox; the
event loop delivers them to the ``Generation``, whose reader takes them one by one. The two
sides share a few plain values and nothing else: how many chunks were sent and taken
(backpressure), and the step at which the caller cancelled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sluice.domain import Chunk, FinishReason, SamplingParams
from sluice.errors import SluiceError
from sluice.generation.engine import SchedulerStats, TokenStream
from sluice.generation.generate import SequenceOutput
from sluice.generation.kv_cache import SequenceCache
from sluice.generation.sampling import TokenSampler


@dataclass(frozen=True, slots=True)
class End:
    """How a generation ended: a finish reason, or an error."""

    reason: FinishReason | None
    error: SluiceError | None = None


@dataclass(eq=False)
class EngineSequence:
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    reserved_tokens: int
    handle: Generation
    cache: SequenceCache | None = None
    sampler: TokenSampler | None = None
    output: SequenceOutput | None = None
    last_token: int = 0
    sent: int = 0
    # Written by the event loop, read by the engine (plain values: no lock needed).
    taken: int = 0
    cancel_requested_at_step: int | None = None
    paused: bool = False
    #: Priority level (1 is the most urgent; 0: the default level).
    priority: int = 0
    #: When it started waiting to join, on the engine's clock (set by ``Schedule.queue``).
    queued_at: float = 0.0


class Generation(TokenStream):
    """One request's stream of chunks (the caller's side). Iterate it; leaving it early
    (``cancel`` or ``aclose``, e.g. when the caller goes away) ends the sequence at the
    next step boundary."""

    def __init__(
        self, *, prompt_tokens: int, stats: SchedulerStats, wake: Callable[[], None]
    ) -> None:
        self._stats = stats
        self._wake = wake
        self._items: deque[Chunk | End] = deque()
        self._wakeup = asyncio.Event()
        self._sequence: EngineSequence | None = None
        self._ended = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def attach(self, sequence: EngineSequence) -> None:
        self._sequence = sequence

    async def __anext__(self) -> Chunk:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if isinstance(item, End):
            self._ended = True
            self.finish_reason = item.reason
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        self.completion_tokens += 1
        self.finish_reason = item.finish_reason
        sequence = self._sequence
        if sequence is not None:
            sequence.taken += 1
            if sequence.paused:
                self._wake()
        return item

    @property
    def ended(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        sequence = self._sequence
        if sequence is not None and sequence.cancel_requested_at_step is None:
            sequence.cancel_requested_at_step = self._stats.decode_steps
            self._wake()

    async def aclose(self) -> None:
        if not self._ended:
            self.cancel()

    def push(self, item: Chunk | End) -> None:
        """Deliver one item (on the event loop)."""
        self._items.append(item)
        self._wakeup.set()


def deliver(outbox: list[tuple[Generation, Chunk | End]]) -> None:
    """Hand one engine step's items to their generations (called on the event loop)."""
    for handle, item in outbox:
        handle.push(item)
