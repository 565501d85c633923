"""Choosing candidates: the chain a called name resolves to, which candidate a call tries
next (a fallback, or a retry after a back-off), and which ones it passes over and why."""

from __future__ import annotations

import asyncio
import random

from sluice.clock import Clock
from sluice.domain import InferResult
from sluice.errors import BreakerOpenError, ModelNotReadyError, SluiceError, UnavailableError
from sluice.loader import ModelVersion
from sluice.metrics import Metrics
from sluice.registry.table import ModelTable
from sluice.routing.guardrail import Guardrail, Guardrails
from sluice.routing.remote import Remotes
from sluice.routing.walk import Attempt, RetryBudget, Walk, label
from sluice.settings import FallbackTarget, Settings

_EWMA_WEIGHT = 0.2
_MAX_CHAINS = 1024
"""Chains kept built (for loaded models only); past this many the cache starts again."""


class Candidates:
    def __init__(
        self,
        table: ModelTable,
        settings: Settings,
        *,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random,
        remotes: Remotes,
    ) -> None:
        self._table = table
        self.remotes = remotes
        self._settings = settings.retry
        self._aliases = settings.aliases
        self._metrics = metrics
        self._clock = clock
        self._random = rng
        self._budgets: dict[str, RetryBudget] = {}
        self._service_time: dict[tuple[str, str], float] = {}
        #: Chains built, by called name and version, with the fallbacks they were built from
        #: (a reload that changes them makes a new tuple, so a stale chain is never used).
        self._chains: dict[
            tuple[str, str], tuple[tuple[FallbackTarget, ...], tuple[FallbackTarget, ...]]
        ] = {}
        self.guardrails = Guardrails(settings.guardrail, metrics=metrics, clock=clock)

    def chain(self, name: str, version: str = "") -> list[FallbackTarget]:
        """The candidates for a called name, primary first."""
        alias = self._aliases.get(name)
        if alias:
            return list(alias)
        configured = self._table.fallbacks(name)
        known = self._chains.get((name, version))
        if known is not None and known[0] is configured:
            return list(known[1])
        fallbacks = [
            target if target.model else target.model_copy(update={"model": name})
            for target in configured
        ]
        chain = [FallbackTarget(model=name, version=version), *fallbacks]
        if self._table.has_model(name):  # never one entry per name a caller makes up
            if len(self._chains) >= _MAX_CHAINS:  # nor per version string
                self._chains.clear()
            self._chains[name, version] = (configured, tuple(chain))
        return chain

    def walk(self, name: str, version: str) -> Walk:
        """A new call's walk; the call counts in its name's retry budget."""
        known = name in self._aliases or self._table.has_model(name)
        key = name if known else ""  # never one budget per name a caller makes up
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RetryBudget(self._settings, self._clock)
        budget.record_call()
        walk = Walk(self.chain(name, version), budget, caller_version=name not in self._aliases)
        self._give_way(walk)
        return walk

    def _give_way(self, walk: Walk) -> None:
        """Candidates over their latency guardrail go after the others (not when every
        candidate is over it), except for the call that is a tripped version's probe."""
        guards = {index: self.guardrail(target) for index, target in enumerate(walk.chain)}
        tripped = {i: guard for i, guard in guards.items() if guard is not None and guard.tripped}
        if not tripped or len(tripped) == len(walk.chain):
            return
        walk.demoted = {index for index, guard in tripped.items() if guard.gives_way()}

    def guardrail(self, target: FallbackTarget) -> Guardrail | None:
        """The latency guardrail of the version a candidate resolves to (None: it has none,
        or it cannot serve now, or it is remote)."""
        if target.endpoint:
            return None
        guardrail_ms = self._table.latency_guardrail_ms(target.model)
        if guardrail_ms is None:
            return None
        try:
            spec = self._table.get(target.model, target.version, backend=target.backend).spec
        except SluiceError:
            return None
        return self.guardrails.get(guardrail_ms, spec.name, spec.version, spec.backend)

    def measured(self, model: str, version: str, backend: str, seconds: float) -> None:
        """A latency for the version's guardrail, when its model has one: an answer's, or a
        generation's first token's."""
        guardrail_ms = self._table.latency_guardrail_ms(model)
        if guardrail_ms is not None:
            guard = self.guardrails.get(guardrail_ms, model, version, backend)
            if guard is not None:
                guard.record(seconds)

    def check(self, target: FallbackTarget) -> ModelVersion | None:
        """The candidate's version, if it can take a call now: ready, breaker not open (a
        remote candidate: None)."""
        if target.endpoint:
            self.remotes.check(target)
            return None
        model = self._table.get(target.model, target.version, backend=target.backend)
        if model.breaker.is_open():
            raise BreakerOpenError(
                f"model '{target.model}' version {model.spec.version}: backend "
                f"{model.spec.backend} is failing and its circuit breaker is open; retry later"
            )
        return model

    def usable(self, name: str, walk: Walk, index: int, deadline: float | None) -> bool:
        """Whether the candidate at ``index`` can take the call now and is expected to
        answer within the deadline; if not, it is passed over (and noted)."""
        target = walk.chain[index]
        try:
            self.check(target)
        except SluiceError as exc:
            reason = "breaker" if isinstance(exc, BreakerOpenError) else "health"
            self.skip(name, walk, index, reason, exc)
            return False
        if deadline is None:
            return True
        key = (label(target), "") if target.endpoint else (target.model, target.version)
        expected = self._service_time.get(key, 0.0)
        if self._clock() + expected < deadline:
            return True
        why = ModelNotReadyError(
            f"model '{target.model}' usually takes {expected:.3f}s, more than the deadline leaves"
        )
        self.skip(name, walk, index, "deadline", why)
        return False

    def may_hop(self, name: str, walk: Walk, index: int) -> bool:
        """A fallback after a transient failure needs room in the budget (it is charged only
        when it fails too); the call's first candidate, one after a context overflow, or
        one the latency guardrail put after the others (it would have gone first) needs
        none."""
        if not walk.after_transient_failure or index in walk.demoted or walk.budget.has_room():
            return True
        self.skip(name, walk, index, "budget", UnavailableError("the retry budget is spent"))
        return False

    def fallback(
        self, name: str, walk: Walk, deadline: float | None, *, after: int
    ) -> Attempt | None:
        """The first usable candidate not tried yet, down the chain from ``after``."""
        for index in walk.untried(after):
            if self.usable(name, walk, index, deadline) and self.may_hop(name, walk, index):
                return Attempt(walk.chain[index], index, hop=bool(walk.errors))
        return None

    async def retry(
        self, name: str, walk: Walk, deadline: float | None, *, after: int
    ) -> Attempt | None:
        """A candidate already tried, again, after a back-off: within ``max_attempts``, the
        deadline and the budget."""
        if walk.retries + 1 >= self._settings.max_attempts:
            return None
        index = next((i for i in walk.around(after) if self.usable(name, walk, i, deadline)), None)
        if index is None:
            return None
        cap_ms = min(
            self._settings.max_backoff_ms, self._settings.initial_backoff_ms * 2**walk.retries
        )
        pause_s = self._random.uniform(0, cap_ms) / 1000
        if deadline is not None and self._clock() + pause_s >= deadline:
            return None
        if not walk.budget.try_spend():
            self.skip(name, walk, index, "budget", UnavailableError("the retry budget is spent"))
            return None
        walk.retries += 1
        self._metrics.retries.labels(name).inc()
        if pause_s > 0:
            await asyncio.sleep(pause_s)
        return Attempt(walk.chain[index], index)

    def skip(self, name: str, walk: Walk, index: int, reason: str, why: SluiceError) -> None:
        """Note a candidate passed over (once per call and candidate): for the attempt's log
        record, the metric and the error the call may end with."""
        if index in walk.skipped:
            return
        walk.skipped[index] = (reason, why)
        target = walk.chain[index]
        walk.unlogged.append(f"{label(target)}: {reason}")
        if why.transient:  # an unknown model or version is the caller's mistake, not a skip
            if index == 0 and walk.caller_version:  # never a label value a caller made up
                target = target.model_copy(update={"version": ""})
            self._metrics.fallback_skipped.labels(name, label(target), reason).inc()

    def remote_targets(self) -> list[FallbackTarget]:
        """Every remote candidate of the aliases and of the models' fallback chains."""
        chains = [*self._aliases.values()]
        chains += [list(self._table.fallbacks(name)) for name in self._table.model_names()]
        return [target for chain in chains for target in chain if target.endpoint]

    def learn(self, result: InferResult, seconds: float, target: FallbackTarget) -> None:
        """How long the version that answered took (its expected service time, and its
        latency guardrail's window; a remote candidate's: its expected time only)."""
        keys = [(result.model, result.version), (result.model, "")]
        if target.endpoint:
            keys = [(label(target), "")]
        else:
            self.measured(result.model, result.version, result.backend, seconds)
        for key in keys:
            old = self._service_time.get(key)
            self._service_time[key] = (
                seconds if old is None else old + _EWMA_WEIGHT * (seconds - old)
            )
