"""Generations the router serves without running a model here: a model's degraded text
(``StaticGeneration``), a remote candidate's stream (``RemoteGeneration``) and a cached
greedy generation replayed (``ReplayedGeneration``); and ``RecordedGeneration``, one
running here whose chunks are kept once it ends normally. Each is a ``Generation``, served
by the transport like one running here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from sluice.dataplane import Generation, GenerationListener
from sluice.dataplane.served import Named
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
        self.cached = False
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
        self.cached = False
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


class ReplayedGeneration:
    """A greedy generation kept in the response cache, its chunks replayed as they were
    made (``cached`` says so: the transport marks the response); or, given why (``degraded``:
    every candidate failed or is open), the degraded tier's answer, marked ``cache``."""

    def __init__(
        self, served: Served, chunks: list[Chunk], *, prompt_tokens: int, degraded: str = ""
    ) -> None:
        self.spec = served
        self.fallback_reason = degraded
        self.endpoint = ""
        self.degraded = "cache" if degraded else ""
        self.cached = not degraded
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._chunks = chunks

    def listen(self, listener: GenerationListener) -> None:
        """A replay is not mirrored."""

    def cancel(self) -> None:
        self._chunks = []
        self.finish_reason = self.finish_reason or FinishReason.CANCELLED

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        while self._chunks:
            chunk, self._chunks = self._chunks[0], self._chunks[1:]
            self.completion_tokens += chunk.token_id != NO_TOKEN
            self.finish_reason = chunk.finish_reason
            yield chunk

    async def __aenter__(self) -> ReplayedGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class RecordedGeneration:
    """A generation running here, its chunks kept: when it ends with ``stop`` or
    ``length`` (not cancelled, not failed, not left early), ``keep`` gets them."""

    def __init__(self, inner: Generation, keep: Callable[[list[Chunk], int], None]) -> None:
        self._inner = inner
        self._keep = keep
        self._chunks: list[Chunk] = []
        self.fallback_reason = inner.fallback_reason
        self.endpoint = inner.endpoint
        self.degraded = inner.degraded
        self.cached = inner.cached

    @property
    def spec(self) -> Named:
        return self._inner.spec

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._inner.finish_reason

    def listen(self, listener: GenerationListener) -> None:
        self._inner.listen(listener)

    def cancel(self) -> None:
        self._inner.cancel()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        async for chunk in self._inner:
            self._chunks.append(chunk)
            yield chunk

    async def __aenter__(self) -> RecordedGeneration:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._inner.__aexit__(*exc_info)
        ended = self._chunks and self._chunks[-1].finish_reason in _KEPT
        if exc_info[0] is None and ended:
            self._keep(self._chunks, self.prompt_tokens)


_KEPT = (FinishReason.STOP, FinishReason.LENGTH)
