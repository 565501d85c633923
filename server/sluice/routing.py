"""Routing: the name a client calls -> an ordered chain of candidates, and the one retry
layer, which spends the call's deadline and the called name's retry budget.

A call tries the first candidate that is ready, whose breaker is closed and whose expected
service time fits the remaining deadline. On a transient failure it falls back to the next
candidate it has not tried yet: a fallback is not a retry, so it needs no back-off and costs
the budget nothing when it answers (one that fails too is charged, so a total outage still
cannot multiply the load beyond the budget). Once every candidate was tried, it retries the
chain from the top after a back-off with full jitter, while the deadline, ``max_attempts`` and
the budget allow. A fatal error (bad input, unknown model) is returned at once and retried
nowhere. While untried candidates remain, one attempt (a generation: its first token) may use
only ``attempt_share`` of the remaining deadline, so a hung primary leaves time for its
fallback. A candidate passed over (breaker, health, deadline, budget) is logged with the
attempt, counted in ``sluice_fallback_skipped_total`` and named in the error a failed call
gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from sluice import logs
from sluice.admission import Ticket
from sluice.errors import (
    BreakerOpenError,
    ContextOverflowError,
    DeadlineExceededError,
    DrainingError,
    ExecutorError,
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
from sluice.tracing import Attributes, Tracing, current_again, record_decode_summary

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

    def has_room(self) -> bool:
        """Whether a retry may be spent now (nothing is spent)."""
        self._forget_before(self._clock() - self._settings.budget_window_s)
        allowed = max(
            self._settings.budget_min_retries, int(self._settings.budget_ratio * len(self._calls))
        )
        return len(self._retries) < allowed

    def try_spend(self) -> bool:
        """Spend one retry, if there is room."""
        if not self.has_room():
            return False
        self._retries.append(self._clock())
        return True

    def charge(self) -> None:
        """Count an extra attempt that was made and failed (a fallback), room or not."""
        self._retries.append(self._clock())

    def _forget_before(self, horizon: float) -> None:
        for stamps in (self._calls, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()


@dataclass(frozen=True, slots=True)
class _Attempt:
    target: FallbackTarget
    index: int
    #: A fallback after a failure: charged to the budget if it fails too.
    hop: bool = False


@dataclass(slots=True)
class _Walk:
    """One call's way down its chain: what it tried, what failed, what it passed over."""

    chain: list[FallbackTarget]
    budget: RetryBudget
    #: The first candidate's version is the caller's (any string), not the config's.
    caller_version: bool
    tried: set[int] = field(default_factory=set)
    errors: list[SluiceError] = field(default_factory=list)
    #: Candidates passed over, by index: (metric reason, why).
    skipped: dict[int, tuple[str, SluiceError]] = field(default_factory=dict)
    #: Skips not yet in an attempt's log record.
    unlogged: list[str] = field(default_factory=list)
    attempts: int = 0
    retries: int = 0

    def around(self, after: int) -> list[int]:
        """Every candidate, down the chain from ``after`` and round to the top."""
        return [(after + 1 + step) % len(self.chain) for step in range(len(self.chain))]

    def untried(self, after: int) -> list[int]:
        return [index for index in self.around(after) if index not in self.tried]

    def alone(self, index: int) -> bool:
        """Whether nothing is left to fall back to after the candidate at ``index`` (every
        other one tried or passed over): then it may use the whole remaining deadline."""
        return all(i == index or i in self.skipped for i in self.untried(index))

    def failure(self, name: str) -> SluiceError:
        skipped = {_label(self.chain[i]): why for i, (_, why) in self.skipped.items()}
        return _combined(name, self.errors, skipped)


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
        self._budgets: dict[str, RetryBudget] = {}
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
        raise _combined(name, errors, {})

    async def infer(
        self, request: InferRequest, *, deadline: float | None, ticket: Ticket | None = None
    ) -> InferResult:
        walk = self._walk(request.model, request.version)
        attempt = self._fallback(request.model, walk, deadline, after=-1)
        while attempt is not None:
            walk.attempts += 1
            walk.tried.add(attempt.index)
            started = self._clock()
            try:
                with self._tracing.span(
                    "sluice.attempt", self._span_attributes(attempt, walk.attempts)
                ) as span:
                    result = await self._try(request, attempt, walk, deadline, ticket)
                    self._log(request, attempt, walk, self._clock() - started, result=result)
            except SluiceError as exc:
                latency_s = self._clock() - started
                failed, attempt = attempt, None
                walk.errors.append(exc)
                if failed.hop and exc.transient:  # a fallback that failed too: extra load
                    walk.budget.charge()
                if _retryable(exc):
                    attempt = await self._hop(request.model, walk, failed, exc, deadline)
                with current_again(span):  # the record says where the call went next
                    self._log(request, failed, walk, latency_s, error=exc, then=attempt)
                continue
            result = self._annotate(request.model, result, attempt, walk.attempts)
            if self._shadow is not None:  # schedules a mirror, never waits for one
                self._shadow.after_infer(request, result)
            return result
        raise walk.failure(request.model)

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
        takes the call: the response says why). One that fails before its first token, or
        makes none within its share of the deadline, hands the call to the next (a fallback,
        as for ``infer``); after the first token a failure ends the stream (the tokens sent
        stand). With no candidate left, the error is the most telling one: a context
        overflow names both numbers. The prompt's tokens plus ``max_new_tokens`` are added
        to the call's admission ``ticket`` before the generation is queued.
        """
        walk = self._walk(request.model, request.version)
        reason = ""
        for index, target in enumerate(walk.chain):
            if not self._usable(request.model, walk, index, deadline) or not self._may_hop(
                request.model, walk, index
            ):
                why = walk.skipped[index][1].message
                reason = reason or f"model '{target.model}' cannot serve now: {why}"
                continue
            hop = any(error.transient for error in walk.errors)
            walk.tried.add(index)
            try:
                started = await self._start_generation(
                    request, target, deadline, ticket, alone=walk.alone(index)
                )
            except _PassOver as passed:
                walk.errors.append(passed.error)
                if hop and passed.error.transient:
                    walk.budget.charge()
                reason = reason or passed.reason
                continue
            if index > 0:
                self._metrics.fallbacks.labels(
                    request.model, f"{started.spec.name}/{started.spec.version}"
                ).inc()
                log.info(
                    "generation for %s served by %s: %s",
                    logs.clip(request.model),
                    logs.clip(target.model),
                    reason,
                )
            return started.with_fallback_reason(reason if index > 0 else "")
        raise walk.failure(request.model)

    async def _start_generation(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        deadline: float | None,
        ticket: Ticket | None,
        *,
        alone: bool,
    ) -> RoutedGeneration:
        """The generation on one candidate, once its first chunk is out; ``_PassOver``
        when the next candidate should take it."""
        try:
            model = self._service.generation_model(target.model, target.version, target.backend)
        except SluiceError as exc:
            raise _PassOver(exc, f"model '{target.model}' cannot serve now: {exc.message}") from exc
        model.enter()  # an unload of this version waits until the generation ends
        try:
            budget_s = None if alone else self._attempt_budget_s(deadline, alone=False)
            return await self._first_chunk(request, target, model, deadline, budget_s, ticket)
        except BaseException:
            model.leave()
            raise

    async def _first_chunk(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        model: ModelVersion,
        deadline: float | None,
        budget_s: float | None,
        ticket: Ticket | None,
    ) -> RoutedGeneration:
        """Submit and wait for the first chunk, at most ``budget_s`` (None: the generation's
        own deadline bounds it); the breaker counts a candidate that made none in time."""
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
                try:
                    async with asyncio.timeout(budget_s):
                        first = await anext(stream, None)
                except TimeoutError as exc:  # inside the breaker: a backend fault
                    raise self._no_first_token(target, budget_s, deadline) from exc
        except SluiceError as exc:
            await stream.aclose()  # the engine drops the sequence at its next step
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
        walk: _Walk,
        deadline: float | None,
        ticket: Ticket | None,
    ) -> InferResult:
        target = attempt.target
        alone = walk.alone(attempt.index)
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
            # with untried candidates left, the attempt's share is enforced here.
            async with asyncio.timeout(None if alone else budget_s):
                result = await self._service.infer(sub, deadline=attempt_deadline, ticket=ticket)
        except (TimeoutError, DeadlineExceededError) as exc:
            error = self._timeout_error(target, budget_s, deadline, exc)
            if error is exc:
                raise
            raise error from exc
        self._learn(result, self._clock() - started)
        return result

    def _attempt_budget_s(self, deadline: float | None, *, alone: bool) -> float | None:
        if deadline is None:
            return None
        remaining = max(0.0, deadline - self._clock())
        return remaining if alone else remaining * self._settings.attempt_share

    def _no_first_token(
        self, target: FallbackTarget, budget_s: float | None, deadline: float | None
    ) -> SluiceError:
        if deadline is not None and self._clock() >= deadline:
            return DeadlineExceededError(
                f"the call's deadline passed before model '{target.model}' made its first token"
            )
        return ExecutorError(
            f"model '{target.model}' made no first token within this attempt's "
            f"{budget_s or 0:.3f}s share of the deadline"
        )

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

    async def _hop(
        self, name: str, walk: _Walk, failed: _Attempt, exc: SluiceError, deadline: float | None
    ) -> _Attempt | None:
        """After a transient failure: the next untried candidate (a fallback), else the chain
        again after a back-off (a retry): a ``sluice.fallback`` or ``sluice.retry`` span."""
        attributes = {"sluice.from": _label(failed.target), "error.type": type(exc).__name__}
        with self._tracing.span("sluice.fallback", attributes, leaf=True) as span:
            picked = self._fallback(name, walk, deadline, after=failed.index)
            if picked is None:
                picked = await self._retry(name, walk, deadline, after=failed.index)
                if picked is not None:
                    span.update_name("sluice.retry")
            if picked is not None and span.is_recording():
                span.set_attribute("sluice.to", _label(picked.target))
            return picked

    def _fallback(
        self, name: str, walk: _Walk, deadline: float | None, *, after: int
    ) -> _Attempt | None:
        """The first usable candidate not tried yet, down the chain from ``after``."""
        for index in walk.untried(after):
            if self._usable(name, walk, index, deadline) and self._may_hop(name, walk, index):
                return _Attempt(walk.chain[index], index, hop=bool(walk.errors))
        return None

    def _may_hop(self, name: str, walk: _Walk, index: int) -> bool:
        """A fallback after a transient failure needs room in the budget (it is charged only
        when it fails too); the call's first candidate, or one after a context overflow,
        needs none."""
        if not any(error.transient for error in walk.errors) or walk.budget.has_room():
            return True
        self._skip(name, walk, index, "budget", UnavailableError("the retry budget is spent"))
        return False

    async def _retry(
        self, name: str, walk: _Walk, deadline: float | None, *, after: int
    ) -> _Attempt | None:
        """A candidate already tried, again, after a back-off: within ``max_attempts``, the
        deadline and the budget."""
        if walk.retries + 1 >= self._settings.max_attempts:
            return None
        index = next((i for i in walk.around(after) if self._usable(name, walk, i, deadline)), None)
        if index is None:
            return None
        cap_ms = min(
            self._settings.max_backoff_ms, self._settings.initial_backoff_ms * 2**walk.retries
        )
        pause_s = self._random.uniform(0, cap_ms) / 1000
        if deadline is not None and self._clock() + pause_s >= deadline:
            return None
        if not walk.budget.try_spend():
            self._skip(name, walk, index, "budget", UnavailableError("the retry budget is spent"))
            return None
        walk.retries += 1
        self._metrics.retries.labels(name).inc()
        if pause_s > 0:
            await asyncio.sleep(pause_s)
        return _Attempt(walk.chain[index], index)

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

    def _walk(self, name: str, version: str) -> _Walk:
        """A new call's walk; the call counts in its name's retry budget."""
        known = name in self._aliases or self._service.has_model(name)
        key = name if known else ""  # never one budget per name a caller makes up
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RetryBudget(self._settings, self._clock)
        budget.record_call()
        return _Walk(self.chain(name, version), budget, caller_version=name not in self._aliases)

    def _usable(self, name: str, walk: _Walk, index: int, deadline: float | None) -> bool:
        target = walk.chain[index]
        try:
            self._service.ensure_can_serve(target.model, target.version, target.backend)
        except SluiceError as exc:
            reason = "breaker" if isinstance(exc, BreakerOpenError) else "health"
            self._skip(name, walk, index, reason, exc)
            return False
        if deadline is None:
            return True
        expected = self._service_time.get((target.model, target.version), 0.0)
        if self._clock() + expected < deadline:
            return True
        self._skip(
            name,
            walk,
            index,
            "deadline",
            ModelNotReadyError(
                f"model '{target.model}' usually takes {expected:.3f}s, more than the deadline "
                "leaves"
            ),
        )
        return False

    def _skip(self, name: str, walk: _Walk, index: int, reason: str, why: SluiceError) -> None:
        """Note a candidate passed over (once per call and candidate): for the attempt's log
        record, the metric and the error the call may end with."""
        if index in walk.skipped:
            return
        walk.skipped[index] = (reason, why)
        target = walk.chain[index]
        walk.unlogged.append(f"{_label(target)}: {reason}")
        if why.transient:  # an unknown model or version is the caller's mistake, not a skip
            if index == 0 and walk.caller_version:  # never a label value a caller made up
                target = target.model_copy(update={"version": ""})
            self._metrics.fallback_skipped.labels(name, _label(target), reason).inc()

    def _learn(self, result: InferResult, seconds: float) -> None:
        for key in ((result.model, result.version), (result.model, "")):
            old = self._service_time.get(key)
            self._service_time[key] = (
                seconds if old is None else old + _EWMA_WEIGHT * (seconds - old)
            )

    # -- reporting ------------------------------------------------------------------------

    def _annotate(
        self, name: str, result: InferResult, attempt: _Attempt, attempts: int
    ) -> InferResult:
        fallback = attempt.index > 0
        if fallback:
            self._metrics.fallbacks.labels(name, f"{result.model}/{result.version}").inc()
        result.parameters.update(
            sluice_served_by=f"{result.model}/{result.version}/{result.backend}",
            sluice_fallback=fallback,
            sluice_attempts=attempts,
        )
        return result

    def _log(
        self,
        request: InferRequest,
        attempt: _Attempt,
        walk: _Walk,
        latency_s: float,
        *,
        result: InferResult | None = None,
        error: SluiceError | None = None,
        then: _Attempt | None = None,
    ) -> None:
        """One record per attempt: its outcome, the candidates passed over since the last
        record and, after a failure, where the call goes next. A first attempt that succeeds
        on the primary is the common case and goes to DEBUG (a log write per call costs the
        event loop); any call that needed a retry or a fallback has all its attempts at INFO,
        failures at WARNING."""
        skipped, walk.unlogged = ", ".join(walk.unlogged) or "-", []
        target = attempt.target
        plain = error is None and walk.attempts == 1 and target.model == request.model
        level = logging.DEBUG if plain else logging.INFO if error is None else logging.WARNING
        if not log.isEnabledFor(level):
            return
        backend = result.backend if result is not None else "-"
        version = result.version if result is not None else target.version or "serving"
        then_text = "-" if error is None else _label(then.target) if then else "none"
        log.log(
            level,
            "attempt %d called=%s model=%s version=%s backend=%s outcome=%s latency_ms=%.3f "
            "error_class=%s skipped=%s next=%s",
            walk.attempts,
            logs.clip(request.model),
            logs.clip(target.model),
            logs.clip(version),
            backend,
            "ok" if error is None else "error",
            latency_s * 1000,
            "-" if error is None else ("transient" if error.transient else "fatal"),
            skipped,
            then_text,
            extra=logs.fields(
                model=target.model,
                version=version,
                backend=backend,
                outcome="ok" if error is None else type(error).__name__,
                attempt=walk.attempts,
                latency_ms=round(latency_s * 1000, 3),
                skipped=skipped,
                next=then_text,
            ),
        )


def _label(target: FallbackTarget) -> str:
    """A candidate as ListModels names it: ``model[/version][@backend]``."""
    version = f"/{target.version}" if target.version else ""
    backend = f"@{target.backend}" if target.backend else ""
    return f"{target.model}{version}{backend}"


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


def _combined(name: str, errors: list[SluiceError], skipped: dict[str, SluiceError]) -> SluiceError:
    """The error to report: a fatal one as is; a lone one as is; otherwise one naming every
    candidate: what each tried one answered and why each other one was passed over."""
    fatal = [e for e in errors if not e.transient] or [
        e for e in skipped.values() if not e.transient and not errors
    ]
    if fatal:
        return fatal[0]
    if len(errors) + len(skipped) == 1:
        return (errors or list(skipped.values()))[0]
    detail = "; ".join(
        [e.message for e in errors]
        + [f"skipped {label}: {e.message}" for label, e in skipped.items()]
    )
    pushbacks = [e.retry_after_ms for e in errors if e.retry_after_ms is not None]
    return UnavailableError(
        f"no candidate for '{name}' could serve the call: {detail}",
        retry_after_ms=max(pushbacks) if pushbacks else None,
    )
