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


@dataclass(frozen=True, slots=True)
class RemoteChunk:
    """One message of a remote generation: who serves it, its chunks (one per token; one
    with ``NO_TOKEN`` for text no token came with), and the prompt's tokens once told."""

    served: Served
    chunks: tuple[Chunk, ...]
    prompt_tokens: int | None = None


class RemoteGeneration:
    """A remote candidate's generation, its first message already received: the remote's
    chunks relayed as they arrive. Leaving the block ends the remote call (``close``)."""

    def __init__(
        self,
        first: RemoteChunk,
        rest: AsyncIterator[RemoteChunk],
        *,
        endpoint: str,
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.spec = first.served
        self.fallback_reason = ""
        self.endpoint = endpoint
        self.degraded = ""
        self._first: RemoteChunk | None = first
        self._rest = rest
        self._close = close
        self._cancelled = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def listen(self, listener: GenerationListener) -> None:
        """Remote generations are not mirrored."""

    def cancel(self) -> None:
        self._cancelled = True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        first, self._first = self._first, None
        messages = [first] if first is not None else []
        while True:
            for message in messages:
                if message.prompt_tokens is not None:
                    self.prompt_tokens = message.prompt_tokens
                for chunk in message.chunks:
                    if chunk.token_id != NO_TOKEN:
                        self.completion_tokens += 1
                    self.finish_reason = chunk.finish_reason
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
            if self._cancelled:
                self.finish_reason = FinishReason.CANCELLED
                return
            message_or_none = await anext(self._rest, None)
            if message_or_none is None:
                return
            messages = [message_or_none]

    async def __aenter__(self) -> RemoteGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()
