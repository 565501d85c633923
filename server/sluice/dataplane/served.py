"""A generation being served: its chunks (the first one already made), the version it runs
on, and what it costs (the version's statistics, generation metrics, its decode span)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from opentelemetry.trace import Span

from sluice.clock import Clock
from sluice.domain import Chunk, FinishReason
from sluice.errors import SluiceError
from sluice.generation.engine import TokenStream
from sluice.metrics import GenerationMetrics
from sluice.repository import ModelSpec
from sluice.stats import ModelStats
from sluice.tracing import record_decode_summary


class GenerationListener(Protocol):
    """Hears every chunk of a generation, and whether it ended normally (a shadow's trace)."""

    def keep(self, chunk: Chunk) -> None: ...
    def finished(self) -> None: ...


class Named(Protocol):
    """Who serves a generation (a ``ModelSpec``, or what a stand-in names)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def backend(self) -> str: ...


class Generation(Protocol):
    """What the transport serves a generation from: one running here
    (``ServedGeneration``), on a remote candidate, or a degraded answer."""

    fallback_reason: str
    endpoint: str
    """The remote endpoint that serves it ("" here)."""
    degraded: str
    """``static`` for a degraded answer ("" for a generated one)."""
    cached: bool
    """Replayed from the response cache."""

    @property
    def spec(self) -> Named: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> FinishReason | None: ...
    def listen(self, listener: GenerationListener) -> None: ...
    def cancel(self) -> None: ...
    def __aiter__(self) -> AsyncIterator[Chunk]: ...
    async def __aenter__(self) -> Generation: ...
    async def __aexit__(self, *exc_info: object) -> None: ...


class ServedGeneration:
    """Iterate it inside ``async with`` (leaving the block ends the generation and records
    it); ``cancel`` stops it at the engine's next step."""

    def __init__(
        self,
        stream: TokenStream,
        first: Chunk,
        spec: ModelSpec,
        *,
        stats: ModelStats,
        on_end: Callable[[], None],
        observer: GenerationMetrics,
        decode_span: contextlib.AbstractContextManager[Span],
        clock: Clock,
        started: float,
    ) -> None:
        self._stream = stream
        self._first: Chunk | None = first
        self._listener: GenerationListener | None = None
        self.spec = spec
        #: Why a fallback serves it rather than the model called ("" when that model does).
        self.fallback_reason = ""
        self.endpoint = ""
        self.degraded = ""
        self.cached = False
        self._stats = stats
        self._on_end = on_end
        self._clock = clock
        self._started = started
        self._first_token_s = clock() - started
        self._failed = False
        self._observer = observer
        self._tracing = contextlib.ExitStack()
        self._decode_span = self._tracing.enter_context(decode_span)
        observer.prompt(stream.prompt_tokens)
        observer.first_token(self._first_token_s)

    def listen(self, listener: GenerationListener) -> None:
        """Tell ``listener`` every chunk from the first on (call before iterating)."""
        self._listener = listener
        if self._first is not None:
            listener.keep(self._first)

    @property
    def prompt_tokens(self) -> int:
        return self._stream.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._stream.completion_tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._stream.finish_reason

    def __aiter__(self) -> ServedGeneration:
        return self

    async def __anext__(self) -> Chunk:
        first, self._first = self._first, None
        if first is not None:
            return first
        try:
            chunk = await anext(self._stream)
        except SluiceError:
            self._failed = True
            raise
        if self._listener is not None:
            self._listener.keep(chunk)
        return chunk

    def cancel(self) -> None:
        self._stream.cancel()

    async def __aenter__(self) -> ServedGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stream.aclose()
        self._on_end()
        self._record()

    def _record(self) -> None:
        """Count the generation in the model's statistics: time to the first token as its
        queue time, the rest as compute (one execution per generation)."""
        seconds = self._clock() - self._started
        ok = not self._failed and self.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        self._stats.record_unbatched(
            queue_s=self._first_token_s, infer_s=seconds - self._first_token_s
        )
        self._stats.record_end(ok=ok, seconds=seconds)
        self._observer.finished(
            tokens=self.completion_tokens, decode_s=seconds - self._first_token_s
        )
        reason = self.finish_reason
        record_decode_summary(
            self._decode_span,
            tokens=self.completion_tokens,
            steps=max(0, self.completion_tokens - 1),
            finish_reason=reason.value if reason is not None else "error",
            prompt_tokens=self.prompt_tokens,
        )
        self._tracing.close()
        if ok and self._listener is not None:
            self._listener.finished()
