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
import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sluice.errors import (
    DeadlineExceededError,
    DrainingError,
    ModelNotReadyError,
    OverloadedError,
    SluiceError,
    UnavailableError,
)
from sluice.metrics import Metrics
from sluice.service import InferenceService
from sluice.settings import FallbackTarget, RetrySettings, Settings
from sluice.tensors import InferRequest, InferResult

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
    ) -> None:
        self._service = service
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

    async def infer(self, request: InferRequest, *, deadline: float | None) -> InferResult:
        chain = self.chain(request.model, request.version)
        self._budget.record_call()
        errors: list[SluiceError] = []
        attempt = self._pick(chain, deadline, after=-1)
        for number in range(1, self._settings.max_attempts + 1):
            if attempt is None:
                break
            try:
                result = await self._try(request, attempt, chain, deadline, number)
            except SluiceError as exc:
                errors.append(exc)
                if not _retryable(exc) or not await self._may_retry(
                    request.model, number, deadline
                ):
                    break
                attempt = self._pick(chain, deadline, after=attempt.index)
                continue
            return self._annotate(request.model, result, attempt, number)
        raise _combined(request.model, errors) if errors else self._nothing_to_try(request)

    # -- one attempt ----------------------------------------------------------------------

    async def _try(
        self,
        request: InferRequest,
        attempt: _Attempt,
        chain: list[FallbackTarget],
        deadline: float | None,
        number: int,
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
                result = await self._service.infer(sub, deadline=attempt_deadline)
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
        self._log(request, target, result.backend, started, None, number)
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
    ) -> None:
        """One record per attempt. A first attempt that succeeds on the primary is the common
        case and goes to DEBUG (a log write per call costs the event loop); any call that
        needed a retry or a fallback has all its attempts at INFO, failures at WARNING."""
        plain = error is None and number == 1 and target.model == request.model
        level = logging.DEBUG if plain else logging.INFO if error is None else logging.WARNING
        log.log(
            level,
            "attempt %d called=%s model=%s version=%s backend=%s outcome=%s latency_ms=%.3f "
            "error_class=%s",
            number,
            request.model,
            target.model,
            target.version or "serving",
            backend or "-",
            "ok" if error is None else "error",
            (self._clock() - started) * 1000,
            "-" if error is None else ("transient" if error.transient else "fatal"),
        )


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
