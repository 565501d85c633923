"""Routing: the name a client calls -> an ordered chain of candidates, and the one retry
layer, which spends the call's deadline and a server-wide retry budget.

A call tries the first candidate that is ready, whose breaker is closed and whose expected
service time fits the remaining deadline. On a transient failure it moves down the chain
(wrapping round to the top when it runs out), after a back-off with full jitter, while the
deadline, ``max_attempts`` and the retry budget allow. A fatal error (bad input, unknown
model) is returned at once and retried nowhere. While other candidates remain, one attempt
may use only ``attempt_share`` of the remaining deadline, so a hung primary leaves time for
its fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import Span

from sluice import logs
from sluice.admission import Ticket
from sluice.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    DrainingError,
    ModelNotReadyError,
    OverloadedError,
    RequestCancelledError,
    SluiceError,
    UnavailableError,
)
from sluice.generation.generate import Chunk, FinishReason
from sluice.generation.request import GenerationRequest
from sluice.generation.scheduler import Generation
from sluice.loader import ModelVersion
from sluice.metrics import GenerationMetrics, Metrics
from sluice.repository import ModelSpec
from sluice.service import InferenceService
from sluice.settings import FallbackTarget, RetrySettings, Settings
from sluice.shadow import GenerationTrace, Shadower
from sluice.stats import ModelStats
from sluice.tensors import InferRequest, InferResult
from sluice.tracing import Attributes, Tracing, record_decode_summary

log = logging.getLogger(__name__)

Clock = Callable[[], float]

_EWMA_WEIGHT = 0.2


class RetryBudget:
    """Retries allowed: at most ``budget_ratio`` of the calls in the window (plus a floor),
    so retries cannot multiply the load of an outage."""

    def __init__(self, settings: RetrySettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_call(self) -> None:
        now = self._clock()
        self._calls.append(now)
        self._forget_before(now - self._settings.budget_window_s)

    def try_spend(self) -> bool:
        now = self._clock()
        self._forget_before(now - self._settings.budget_window_s)
        allowed = max(
            self._settings.budget_min_retries, int(self._settings.budget_ratio * len(self._calls))
        )
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True

    def _forget_before(self, horizon: float) -> None:
        for stamps in (self._calls, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()


@dataclass(frozen=True, slots=True)
class _Attempt:
    target: FallbackTarget
    index: int


class Router:
    def __init__(
        self,
        service: InferenceService,
        settings: Settings,
        *,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
        shadow: Shadower | None = None,
    ) -> None:
        self._service = service
        self._tracing = tracing or Tracing.off()
        self._shadow = shadow
        self._settings = settings.retry
        self._aliases = settings.aliases
        self._metrics = metrics
        self._clock = clock
        self._random = rng or random.Random()
        self._budget = RetryBudget(settings.retry, clock)
        self._service_time: dict[tuple[str, str], float] = {}

    def chain(self, name: str, version: str = "") -> list[FallbackTarget]:
        """The candidates for a called name, primary first."""
        alias = self._aliases.get(name)
        if alias:
            return list(alias)
        fallbacks = [
            target if target.model else target.model_copy(update={"model": name})
            for target in self._service.fallbacks(name)
        ]
        return [FallbackTarget(model=name, version=version), *fallbacks]

    def ensure_can_serve(self, name: str, version: str = "") -> None:
        """Fail fast when no candidate could serve the call now (e.g. every breaker open)."""
        errors: list[SluiceError] = []
        for target in self.chain(name, version):
            try:
                self._service.ensure_can_serve(target.model, target.version, target.backend)
            except SluiceError as exc:
                errors.append(exc)
            else:
                return
        raise _combined(name, errors)

    async def infer(
        self, request: InferRequest, *, deadline: float | None, ticket: Ticket | None = None
    ) -> InferResult:
        chain = self.chain(request.model, request.version)
        self._budget.record_call()
        errors: list[SluiceError] = []
        attempt = self._pick(chain, deadline, after=-1)
        for number in range(1, self._settings.max_attempts + 1):
            if attempt is None:
                break
            try:
                with self._tracing.span("sluice.attempt", self._span_attributes(attempt, number)):
                    result = await self._try(request, attempt, chain, deadline, number, ticket)
            except SluiceError as exc:
                errors.append(exc)
                if not _retryable(exc):
                    break
                attempt = await self._hop(request.model, chain, attempt, exc, number, deadline)
                continue
            result = self._annotate(request.model, result, attempt, number)
            if self._shadow is not None:  # schedules a mirror, never waits for one
                self._shadow.after_infer(request, result)
            return result
        raise _combined(request.model, errors) if errors else self._nothing_to_try(request)

    def generates(self, name: str, version: str = "") -> bool:
        """Whether the called name's primary is a generation model."""
        primary = self.chain(name, version)[0]
        return self._service.is_generation_model(primary.model, primary.version)

    def text_generation_request(self, request: InferRequest) -> tuple[GenerationRequest, bool]:
        """A generation model's tensor request as a generation request (and ``stream``)."""
        primary = self.chain(request.model, request.version)[0]
        generation, stream = self._service.text_generation_request(
            dataclasses.replace(request, model=primary.model, version=primary.version)
        )
        return dataclasses.replace(generation, model=request.model), stream

    async def generate(
        self, request: GenerationRequest, *, deadline: float | None, ticket: Ticket | None = None
    ) -> RoutedGeneration:
        """Start a generation on the first candidate of the chain that can take it.

        A candidate is passed over when it is not ready, its breaker is open, or the prompt
        and ``max_new_tokens`` do not fit its context (so a fallback with a larger context
        takes the call: the response says why). One that fails before its first token hands
        the call to the next; after the first token a failure ends the stream (the tokens
        sent stand). With no candidate left, the error is the most telling one: a context
        overflow names both numbers. The prompt's tokens plus ``max_new_tokens`` are added
        to the call's admission ``ticket`` before the generation is queued.
        """
        errors: list[SluiceError] = []
        reason = ""
        for index, target in enumerate(self.chain(request.model, request.version)):
            try:
                started = await self._start_generation(request, target, deadline, ticket)
            except _PassOver as passed:
                errors.append(passed.error)
                reason = reason or passed.reason
                continue
            if index > 0:
                self._metrics.fallbacks.labels(request.model, target.model).inc()
                log.info(
                    "generation for %s served by %s: %s",
                    logs.clip(request.model),
                    logs.clip(target.model),
                    reason,
                )
            return started.with_fallback_reason(reason if index > 0 else "")
        if errors:
            raise _combined(request.model, errors)
        raise ModelNotReadyError(f"no candidate for '{request.model}' can generate now")

    async def _start_generation(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        deadline: float | None,
        ticket: Ticket | None,
    ) -> RoutedGeneration:
        """The generation on one candidate, once its first chunk is out; ``_PassOver``
        when the next candidate should take it."""
        try:
            model = self._service.generation_model(target.model, target.version, target.backend)
            self._service.ensure_can_serve(target.model, target.version, target.backend)
        except SluiceError as exc:
            raise _PassOver(exc, f"model '{target.model}' cannot serve now: {exc.message}") from exc
        model.enter()  # an unload of this version waits until the generation ends
        try:
            return await self._first_chunk(request, target, model, deadline, ticket)
        except BaseException:
            model.leave()
            raise

    async def _first_chunk(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        model: ModelVersion,
        deadline: float | None,
        ticket: Ticket | None,
    ) -> RoutedGeneration:
        generator = model.generator
        assert generator is not None
        started = self._clock()
        try:
            prompt_ids = await generator.encode_prompt(request.prompt)
            generator.check_fits(len(prompt_ids), request.params.max_new_tokens)
            if ticket is not None:
                ticket.need(tokens=len(prompt_ids) + request.params.max_new_tokens)
            stream = generator.submit(prompt_ids, request.params, deadline=deadline)
        except ContextOverflowError as exc:
            raise _PassOver(
                exc,
                f"{exc.need} need a larger context than model '{target.model}' "
                f"has ({exc.max_context})",
            ) from exc
        try:
            with (
                self._tracing.prefill_span(
                    model=target.model, version=model.spec.version, prompt_tokens=len(prompt_ids)
                ),
                model.breaker.calling(),
            ):
                first = await anext(stream, None)
        except SluiceError as exc:
            await stream.aclose()
            if not _retryable(exc):
                raise
            reason = f"model '{target.model}' failed before its first token: {exc.message}"
            raise _PassOver(exc, reason) from exc
        except BaseException:
            await stream.aclose()
            raise
        if first is None:
            raise RequestCancelledError("the generation was cancelled before its first token")
        return RoutedGeneration(
            stream,
            first,
            model.spec,
            stats=model.stats,
            on_end=model.leave,
            observer=self._metrics.generation_observer(target.model),
            decode_span=self._tracing.decode_span(model=target.model, version=model.spec.version),
            clock=self._clock,
            started=started,
            shadow=(
                self._shadow.generation_trace(target.model, request.prompt, request.params)
                if self._shadow is not None
                else None
            ),
        )

    # -- one attempt ----------------------------------------------------------------------

    async def _try(
        self,
        request: InferRequest,
        attempt: _Attempt,
        chain: list[FallbackTarget],
        deadline: float | None,
        number: int,
        ticket: Ticket | None,
    ) -> InferResult:
        target = attempt.target
        alone = len(chain) == 1
        budget_s = self._attempt_budget_s(deadline, alone=alone)
        attempt_deadline = None if budget_s is None else self._clock() + budget_s
        sub = request
        if (target.model, target.version, target.backend) != (
            request.model,
            request.version,
            request.backend,
        ):
            sub = dataclasses.replace(
                request, model=target.model, version=target.version, backend=target.backend
            )
        started = self._clock()
        try:
            # Alone, the call's own deadline (batcher and interceptor) bounds the attempt;
            # with other candidates left, the attempt's share is enforced here.
            async with asyncio.timeout(None if alone else budget_s):
                result = await self._service.infer(sub, deadline=attempt_deadline, ticket=ticket)
        except (TimeoutError, DeadlineExceededError) as exc:
            error = self._timeout_error(target, budget_s, deadline, exc)
            self._log(request, target, "", started, error, number)
            if error is exc:
                raise
            raise error from exc
        except SluiceError as exc:
            self._log(request, target, "", started, exc, number)
            raise
        self._learn(result, self._clock() - started)
        self._log(request, target, result.backend, started, None, number, version=result.version)
        return result

    def _attempt_budget_s(self, deadline: float | None, *, alone: bool) -> float | None:
        if deadline is None:
            return None
        remaining = max(0.0, deadline - self._clock())
        return remaining if alone else remaining * self._settings.attempt_share

    def _timeout_error(
        self,
        target: FallbackTarget,
        budget_s: float | None,
        deadline: float | None,
        exc: BaseException,
    ) -> SluiceError:
        if deadline is not None and self._clock() < deadline:
            # Only this attempt's share is spent: a transient failure, the chain goes on.
            return UnavailableError(
                f"model '{target.model}' did not answer within this attempt's "
                f"{budget_s or 0:.3f}s share of the deadline"
            )
        if isinstance(exc, DeadlineExceededError):
            return exc
        return DeadlineExceededError(
            f"the call's deadline passed while model '{target.model}' was working on it"
        )

    async def _may_retry(self, name: str, number: int, deadline: float | None) -> bool:
        if number >= self._settings.max_attempts or not self._budget.try_spend():
            return False
        cap_ms = min(
            self._settings.max_backoff_ms, self._settings.initial_backoff_ms * 2 ** (number - 1)
        )
        pause_s = self._random.uniform(0, cap_ms) / 1000
        if deadline is not None and self._clock() + pause_s >= deadline:
            return False
        self._metrics.retries.labels(name).inc()
        if pause_s > 0:
            await asyncio.sleep(pause_s)
        return True

    async def _hop(
        self,
        name: str,
        chain: list[FallbackTarget],
        failed: _Attempt,
        exc: SluiceError,
        number: int,
        deadline: float | None,
    ) -> _Attempt | None:
        """After a transient failure: back off and pick the next candidate, if the deadline,
        the attempts and the retry budget allow (a ``sluice.fallback`` span, or
        ``sluice.retry`` when the same candidate is tried again)."""
        attributes = {"sluice.from": _label(failed.target), "error.type": type(exc).__name__}
        with self._tracing.span("sluice.fallback", attributes, leaf=True) as span:
            if not await self._may_retry(name, number, deadline):
                return None
            picked = self._pick(chain, deadline, after=failed.index)
            if picked is not None and span.is_recording():
                span.set_attribute("sluice.to", _label(picked.target))
                if picked.index == failed.index:
                    span.update_name("sluice.retry")
            return picked

    def _span_attributes(self, attempt: _Attempt, number: int) -> Attributes | None:
        """What an attempt span says about where it goes (nothing is looked up when off)."""
        if not self._tracing.enabled:
            return None
        target = attempt.target
        attributes: dict[str, str | int | bool] = {
            "sluice.attempt": number,
            "sluice.model": target.model,
            "sluice.fallback": attempt.index > 0,
        }
        try:
            model = self._service.get(target.model, target.version, target.backend)
        except SluiceError:
            return attributes
        attributes["sluice.model.version"] = model.spec.version
        attributes["sluice.backend"] = model.spec.backend
        attributes["sluice.breaker.state"] = model.breaker.state
        return attributes

    # -- choosing -------------------------------------------------------------------------

    def _pick(
        self, chain: list[FallbackTarget], deadline: float | None, *, after: int
    ) -> _Attempt | None:
        """The next usable candidate after index ``after``, wrapping round to the top."""
        order = list(range(after + 1, len(chain))) + list(range(after + 1))
        for index in order:
            if self._usable(chain[index], deadline):
                return _Attempt(chain[index], index)
        return None

    def _usable(self, target: FallbackTarget, deadline: float | None) -> bool:
        try:
            self._service.ensure_can_serve(target.model, target.version, target.backend)
        except SluiceError:
            return False
        if deadline is None:
            return True
        expected = self._service_time.get((target.model, target.version), 0.0)
        return self._clock() + expected < deadline

    def _learn(self, result: InferResult, seconds: float) -> None:
        for key in ((result.model, result.version), (result.model, "")):
            old = self._service_time.get(key)
            self._service_time[key] = (
                seconds if old is None else old + _EWMA_WEIGHT * (seconds - old)
            )

    def _nothing_to_try(self, request: InferRequest) -> SluiceError:
        try:
            self.ensure_can_serve(request.model, request.version)
        except SluiceError as exc:
            return exc
        return ModelNotReadyError(
            f"no candidate for '{request.model}' can answer within the remaining deadline"
        )

    # -- reporting ------------------------------------------------------------------------

    def _annotate(
        self, name: str, result: InferResult, attempt: _Attempt, attempts: int
    ) -> InferResult:
        fallback = attempt.index > 0
        if fallback:
            self._metrics.fallbacks.labels(name, attempt.target.model).inc()
        result.parameters.update(
            sluice_served_by=f"{result.model}/{result.version}/{result.backend}",
            sluice_fallback=fallback,
            sluice_attempts=attempts,
        )
        return result

    def _log(
        self,
        request: InferRequest,
        target: FallbackTarget,
        backend: str,
        started: float,
        error: SluiceError | None,
        number: int,
        *,
        version: str = "",
    ) -> None:
        """One record per attempt. A first attempt that succeeds on the primary is the common
        case and goes to DEBUG (a log write per call costs the event loop); any call that
        needed a retry or a fallback has all its attempts at INFO, failures at WARNING."""
        plain = error is None and number == 1 and target.model == request.model
        level = logging.DEBUG if plain else logging.INFO if error is None else logging.WARNING
        if not log.isEnabledFor(level):
            return
        latency_ms = (self._clock() - started) * 1000
        log.log(
            level,
            "attempt %d called=%s model=%s version=%s backend=%s outcome=%s latency_ms=%.3f "
            "error_class=%s",
            number,
            logs.clip(request.model),
            logs.clip(target.model),
            logs.clip(target.version) or "serving",
            backend or "-",
            "ok" if error is None else "error",
            latency_ms,
            "-" if error is None else ("transient" if error.transient else "fatal"),
            extra=logs.fields(
                model=target.model,
                version=version or target.version or "serving",
                backend=backend or "-",
                outcome="ok" if error is None else type(error).__name__,
                attempt=number,
                latency_ms=round(latency_ms, 3),
            ),
        )


def _label(target: FallbackTarget) -> str:
    return "/".join(part for part in (target.model, target.version, target.backend) if part)


class _PassOver(Exception):
    """A candidate cannot take a generation; the next one may."""

    def __init__(self, error: SluiceError, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


class RoutedGeneration:
    """A started generation: its chunks (the first already made), where it runs, and why
    there when it is not the model called."""

    def __init__(
        self,
        stream: Generation,
        first: Chunk,
        spec: ModelSpec,
        *,
        stats: ModelStats,
        on_end: Callable[[], None],
        observer: GenerationMetrics,
        decode_span: contextlib.AbstractContextManager[Span],
        clock: Clock,
        started: float,
        shadow: GenerationTrace | None = None,
    ) -> None:
        self._stream = stream
        self._first: Chunk | None = first
        #: A sampled call keeps its tokens for its shadow.
        self._shadow = shadow
        if shadow is not None:
            shadow.keep(first)
        self.spec = spec
        self.fallback_reason = ""
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

    def with_fallback_reason(self, reason: str) -> RoutedGeneration:
        self.fallback_reason = reason
        return self

    @property
    def prompt_tokens(self) -> int:
        return self._stream.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._stream.completion_tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._stream.finish_reason

    def __aiter__(self) -> RoutedGeneration:
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
        if self._shadow is not None:
            self._shadow.keep(chunk)
        return chunk

    def cancel(self) -> None:
        self._stream.cancel()

    async def __aenter__(self) -> RoutedGeneration:
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
        if ok and self._shadow is not None:
            self._shadow.finished()


def _retryable(exc: SluiceError) -> bool:
    """Transient backend trouble is retried; load shedding goes back to the client with its
    pushback (retrying it here would only queue again behind the same limit)."""
    return exc.transient and not isinstance(exc, OverloadedError | DrainingError)


def _combined(name: str, errors: list[SluiceError]) -> SluiceError:
    """The error to report: a fatal one as is; otherwise the last, naming every candidate."""
    fatal = [e for e in errors if not e.transient]
    if fatal or len(errors) == 1:
        return (fatal or errors)[0]
    detail = "; ".join(e.message for e in errors)
    pushbacks = [e.retry_after_ms for e in errors if e.retry_after_ms is not None]
    return UnavailableError(
        f"no candidate for '{name}' could serve the call: {detail}",
        retry_after_ms=max(pushbacks) if pushbacks else None,
    )
