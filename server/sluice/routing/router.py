"""The router: where the transport's data calls enter the core. It walks a call down its
chain of candidates (``candidates``) and runs each attempt on the data plane."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

from sluice import logs
from sluice.caching import ResponseCache
from sluice.clock import Clock
from sluice.dataplane import DataPlane, Generation
from sluice.domain import Call, GenerationRequest, InferRequest, InferResult, Routing
from sluice.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    SluiceError,
    UnavailableError,
    UnsupportedError,
)
from sluice.metrics import Metrics
from sluice.registry.table import ModelTable
from sluice.routing.answers import Answers
from sluice.routing.candidates import Candidates
from sluice.routing.remote import RemoteClient, Remotes
from sluice.routing.report import log_attempt, span_attributes
from sluice.routing.walk import Attempt, PassOver, Walk, combined, label, retryable
from sluice.settings import FallbackTarget, Settings
from sluice.shadow import Shadower
from sluice.tracing import Tracing, current_again

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        table: ModelTable,
        plane: DataPlane,
        settings: Settings,
        *,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
        shadow: Shadower | None = None,
        remote: RemoteClient | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self._table = table
        self._plane = plane
        self._tracing = tracing or Tracing.off()
        self._shadow = shadow
        self._attempt_share = settings.retry.attempt_share
        self._metrics = metrics
        self._clock = clock
        #: Remote candidates' breakers and readiness (the health prober keeps it).
        self.remotes = Remotes(
            remote,
            settings,
            targets=lambda: self._candidates.remote_targets(),
            metrics=metrics,
            clock=clock,
            tracing=self._tracing,
        )
        self._candidates = Candidates(
            table,
            settings,
            metrics=metrics,
            clock=clock,
            rng=rng or random.Random(),
            remotes=self.remotes,
        )
        self._answers = Answers(
            table,
            cache or ResponseCache(settings.cache, metrics=metrics, clock=clock),
            aliases=settings.aliases,
            metrics=metrics,
            tracing=self._tracing,
        )
        #: Each guarded version's latency guardrail (ListModels shows them).
        self.guardrails = self._candidates.guardrails

    def fail_fast(self, name: str, version: str = "") -> None:
        """Raise now when no candidate of the called name could take a call (every one not
        ready or its breaker open): before anything is decoded or queued."""
        if self._answers.stands_in(name):
            return  # a cached or degraded answer may serve it with every backend down
        errors: list[SluiceError] = []
        for target in self._candidates.chain(name, version):
            try:
                self._candidates.check(target)
            except SluiceError as exc:
                errors.append(exc)
            else:
                return
        raise combined(name, errors, {})

    def generates(self, name: str, version: str = "") -> bool:
        """Whether the called name's primary is a generation model."""
        primary = self._candidates.chain(name, version)[0]
        return not primary.endpoint and self._plane.generates(primary.model, primary.version)

    def text_generation(self, request: InferRequest) -> tuple[GenerationRequest, bool]:
        """A generation model's tensor request as a generation request (and ``stream``)."""
        primary = self._candidates.chain(request.model, request.version)[0]
        generation, stream = self._plane.text_generation(
            dataclasses.replace(request, model=primary.model, version=primary.version)
        )
        return dataclasses.replace(generation, model=request.model), stream

    # -- tensors ------------------------------------------------------------------------

    async def infer(self, request: InferRequest, call: Call) -> InferResult:
        """The answer of the first candidate that gives one; for a model whose config asks,
        a response cache hit first, and its degraded tier when no candidate answers."""
        prepared = await self._answers.prepare(request)
        if prepared is not None:
            hit = await self._answers.hit(prepared, request, call)
            if hit is not None:
                return hit
        walk = self._candidates.walk(request.model, request.version)
        try:
            result = await self._walk(request, walk, call)
        except SluiceError as exc:
            if prepared is None or not retryable(exc):
                raise
            answer = await self._answers.degraded(
                prepared, request, call, error=exc, attempts=walk.attempts
            )
            if answer is None:
                raise
            return answer
        if prepared is not None:
            self._answers.keep(prepared, result)
        return result

    async def _walk(self, request: InferRequest, walk: Walk, call: Call) -> InferResult:
        candidates = self._candidates
        attempt = candidates.fallback(request.model, walk, call.deadline, after=-1)
        while attempt is not None:
            walk.attempts += 1
            walk.tried.add(attempt.index)
            started = self._clock()
            try:
                attributes = (
                    span_attributes(self._table, attempt, walk.attempts)
                    if self._tracing.enabled
                    else None
                )
                with self._tracing.span("sluice.attempt", attributes) as span:
                    result = await self._try(request, attempt, walk, call)
                    log_attempt(request, attempt, walk, self._clock() - started, result=result)
            except SluiceError as exc:
                latency_s = self._clock() - started
                failed, attempt = attempt, None
                walk.errors.append(exc)
                if failed.hop and exc.transient:  # a fallback that failed too: extra load
                    walk.budget.charge()
                if retryable(exc):
                    attempt = await self._hop(request.model, walk, failed, exc, call.deadline)
                with current_again(span):  # the record says where the call went next
                    log_attempt(request, failed, walk, latency_s, error=exc, then=attempt)
                continue
            result.routing = Routing(attempts=walk.attempts, fallback=attempt.index > 0)
            if attempt.index > 0:
                self._metrics.fallbacks.labels(
                    request.model, f"{result.model}/{result.version}"
                ).inc()
            if self._shadow is not None:  # schedules a mirror, never waits for one
                self._shadow.after_infer(request, result)
            return result
        raise walk.failure(request.model)

    async def _try(
        self, request: InferRequest, attempt: Attempt, walk: Walk, call: Call
    ) -> InferResult:
        target = attempt.target
        alone = walk.alone(attempt.index)
        budget_s = self._attempt_budget_s(call.deadline, alone=alone)
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
        # Alone, the call's own deadline (batcher and interceptor) bounds the attempt, and
        # the attempt's deadline is the call's; with untried candidates left, the attempt's
        # share is its deadline, enforced here.
        attempt_call = call
        if not alone and budget_s is not None:
            attempt_call = dataclasses.replace(call, deadline=started + budget_s)
        try:
            if target.endpoint:
                answer = self.remotes.infer(target, sub, timeout_s=budget_s)
            else:
                answer = self._plane.infer(sub, attempt_call)
            if alone:
                result = await answer
            else:
                async with asyncio.timeout(budget_s):
                    result = await answer
        except (TimeoutError, DeadlineExceededError) as exc:
            error = self._timeout_error(target, call.deadline, budget_s, exc)
            if error is exc:
                raise
            raise error from exc
        self._candidates.learn(result, self._clock() - started, target)
        return result

    def _attempt_budget_s(self, deadline: float | None, *, alone: bool) -> float | None:
        if deadline is None:
            return None
        remaining = max(0.0, deadline - self._clock())
        return remaining if alone else remaining * self._attempt_share

    def _timeout_error(
        self,
        target: FallbackTarget,
        deadline: float | None,
        budget_s: float | None,
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
        self, name: str, walk: Walk, failed: Attempt, exc: SluiceError, deadline: float | None
    ) -> Attempt | None:
        """After a transient failure: the next untried candidate (a fallback), else the chain
        again after a back-off (a retry): a ``sluice.fallback`` or ``sluice.retry`` span."""
        attributes = {"sluice.from": label(failed.target), "error.type": type(exc).__name__}
        with self._tracing.span("sluice.fallback", attributes, leaf=True) as span:
            picked = self._candidates.fallback(name, walk, deadline, after=failed.index)
            if picked is None:
                picked = await self._candidates.retry(name, walk, deadline, after=failed.index)
                if picked is not None:
                    span.update_name("sluice.retry")
            if picked is not None and span.is_recording():
                span.set_attribute("sluice.to", label(picked.target))
            return picked

    # -- generations --------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, call: Call) -> Generation:
        """Start a generation on the first candidate of the chain that can take it; when
        none can (each failed transiently or is open), the model's degraded tier: the kept
        greedy generation (``from_cache``), else its ``text``, marked as degraded.

        A candidate is passed over when it is not ready, its breaker is open, or the prompt
        and ``max_new_tokens`` do not fit its context (so a fallback with a larger context
        takes the call: the response says why). One that fails before its first token, or
        makes none within its share of the deadline, hands the call to the next (a fallback,
        as for ``infer``); after the first token a failure ends the stream (the tokens sent
        stand). With no candidate left, the error is the most telling one: a context
        overflow names both numbers. The prompt's tokens plus ``max_new_tokens`` are added
        to the call's admission ticket before the generation is queued. A candidate whose
        recent time to first token is over its latency guardrail goes after the others.
        """
        keyed = await self._answers.generation_key(request)
        if keyed is not None and keyed.reads:
            replayed = await self._answers.replayed(keyed, call)
            if replayed is not None:
                return replayed
        try:
            generation = await self._generate(request, call)
            return generation if keyed is None else self._answers.recorded(keyed, generation)
        except SluiceError as exc:
            if not retryable(exc):
                raise
            degraded = await self._answers.degraded_generation(request, keyed, call, error=exc)
            if degraded is None:
                raise
            return degraded

    async def _generate(self, request: GenerationRequest, call: Call) -> Generation:
        candidates = self._candidates
        walk = candidates.walk(request.model, request.version)
        reason = ""
        for index in walk.untried(-1):  # the chain's order; over-guardrail candidates last
            target = walk.chain[index]
            usable = candidates.usable(request.model, walk, index, call.deadline)
            if not usable or not candidates.may_hop(request.model, walk, index):
                why = walk.skipped[index][1].message
                reason = reason or f"model '{target.model}' cannot serve now: {why}"
                continue
            hop = walk.after_transient_failure
            walk.tried.add(index)
            started = self._clock()
            try:
                served = await self._start(request, target, call, alone=walk.alone(index))
            except PassOver as passed:
                walk.errors.append(passed.error)
                if hop and passed.error.transient:
                    walk.budget.charge()
                reason = reason or passed.reason
                continue
            spec = served.spec
            if not target.endpoint:
                candidates.measured(spec.name, spec.version, spec.backend, self._clock() - started)
            if walk.demoted and not reason:
                slow = walk.chain[min(walk.demoted)].model
                reason = f"model '{slow}' is over its latency guardrail"
            return self._served(request, target, served, reason if index > 0 else "")
        raise walk.failure(request.model)

    async def _start(
        self, request: GenerationRequest, target: FallbackTarget, call: Call, *, alone: bool
    ) -> Generation:
        """The generation on one candidate, once its first chunk is out; ``PassOver`` when
        the next candidate should take it."""
        sub = dataclasses.replace(
            request, model=target.model, version=target.version, backend=target.backend
        )
        budget_s = None if alone else self._attempt_budget_s(call.deadline, alone=False)
        try:
            if target.endpoint:
                return await self._remote_generation(sub, target, call, budget_s)
            return await self._plane.generate(sub, call, first_token_s=budget_s)
        except ContextOverflowError as exc:
            raise PassOver(
                exc,
                f"{exc.need} need a larger context than model '{target.model}' "
                f"has ({exc.max_context})",
            ) from exc
        except (ModelNotFoundError, ModelNotReadyError, UnsupportedError) as exc:
            raise PassOver(exc, f"model '{target.model}' cannot serve now: {exc.message}") from exc
        except SluiceError as exc:
            if not retryable(exc):
                raise
            reason = f"model '{target.model}' failed before its first token: {exc.message}"
            raise PassOver(exc, reason) from exc

    async def _remote_generation(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        call: Call,
        first_token_s: float | None,
    ) -> Generation:
        """A remote candidate's generation: its first message within ``first_token_s``,
        the call within the caller's remaining deadline."""
        timeout_s = self._attempt_budget_s(call.deadline, alone=True)
        try:
            return await self.remotes.generate(
                target, request, timeout_s=timeout_s, first_token_s=first_token_s
            )
        except (TimeoutError, DeadlineExceededError) as exc:
            error = self._timeout_error(target, call.deadline, first_token_s, exc)
            if error is exc:
                raise
            raise error from exc

    def _served(
        self,
        request: GenerationRequest,
        target: FallbackTarget,
        served: Generation,
        reason: str,
    ) -> Generation:
        """A started generation, with why a fallback serves it, mirrored when sampled."""
        if reason:
            spec = served.spec
            to = label(target) if target.endpoint else f"{spec.name}/{spec.version}"
            self._metrics.fallbacks.labels(request.model, to).inc()
            if target.endpoint:
                reason = f"{reason}; served by {to}"
            log.info(
                "generation for %s served by %s: %s",
                logs.clip(request.model),
                logs.clip(target.model),
                reason,
            )
            served.fallback_reason = reason
        if self._shadow is not None:
            trace = self._shadow.generation_trace(target.model, request.prompt, request.params)
            if trace is not None:
                served.listen(trace)
        return served
