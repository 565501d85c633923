"""Generations the router serves without running a model here: a model's degraded text
(``StaticGeneration``) and a remote candidate's stream (``RemoteGeneration``). Both are
``Generation``s, served by the transport like one running here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from sluice.dataplane import GenerationListener
from sluice.domain import NO_TOKEN, Chunk, FinishReason


@dataclass(frozen=True, slots=True)
class Served:
    """Who serves a stand-in generation."""

    name: str
    version: str
    backend: str = ""


class StaticGeneration:
    """A generation model's configured degraded text, as one final chunk: no token made it
    (``completion_tokens`` is 0), its finish reason is ``stop`` and ``degraded`` says
    ``static`` (the transport marks the response)."""

    def __init__(self, served: Served, text: str, *, reason: str) -> None:
        self.spec = served
        self.fallback_reason = reason
        self.endpoint = ""
        self.degraded = "static"
        self._chunks = [Chunk(text, NO_TOKEN, FinishReason.STOP)]
        self.finish_reason: FinishReason | None = None

    prompt_tokens = 0
    completion_tokens = 0

    def listen(self, listener: GenerationListener) -> None:
        """Nothing to mirror: no model made this text."""

    def cancel(self) -> None:
        self._chunks.clear()
        self.finish_reason = self.finish_reason or FinishReason.CANCELLED

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        while self._chunks:
            chunk = self._chunks.pop(0)
            self.finish_reason = chunk.finish_reason
            yield chunk

    async def __aenter__(self) -> StaticGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class RemoteGeneration:
    """A remote candidate's generation, its first chunk already received: the remote's
    chunks relayed as they arrive. ``close`` ends the remote call (and releases what the
    call holds) when the caller leaves the block."""

    def __init__(
        self,
        served: Served,
        first: Chunk,
        rest: AsyncIterator[Chunk],
        *,
        endpoint: str,
        usage: Callable[[], tuple[int, int]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.spec = served
        self.fallback_reason = ""
        self.endpoint = endpoint
        self.degraded = ""
        self._first: Chunk | None = first
        self._rest = rest
        self._usage = usage
        self._close = close
        self._cancelled = False
        self.finish_reason: FinishReason | None = first.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self._usage()[0]

    @property
    def completion_tokens(self) -> int:
        return self._usage()[1]

    def listen(self, listener: GenerationListener) -> None:
        """Remote generations are not mirrored."""

    def cancel(self) -> None:
        self._cancelled = True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        first, self._first = self._first, None
        if first is not None:
            yield first
            if first.finish_reason is not None:
                return
        async for chunk in self._rest:
            if self._cancelled:
                self.finish_reason = FinishReason.CANCELLED
                return
            self.finish_reason = chunk.finish_reason
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def __aenter__(self) -> RemoteGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()
