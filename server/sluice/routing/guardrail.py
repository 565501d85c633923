"""The latency guardrail: a model's ``latency_guardrail_ms`` treats calls slower than it as
soft failures, and a version whose recent p95 is over it gives way to the next candidate.

Every answered attempt's latency (queue wait included: what the caller waited) goes into
its version's ``LatencyWindow`` (the latest ``guardrail.window_calls`` calls, none older
than ``guardrail.window_s``). A call slower than the guardrail is counted as slow, apart
from the breaker's failures. Once the window holds ``min_samples`` calls, a p95 over the
guardrail trips the version: calls try the chain's other candidates first, and it serves
only when none of them can (the guardrail reorders, it never refuses). One call per
``probe_interval_s`` still goes to a tripped version, so its p95 keeps being measured; it
recovers when the p95 falls below ``recovery_ratio`` of the guardrail (hysteresis, so a
version near the line does not flap). Each trip and recovery is logged once, with the p95
and the guardrail, and shows in the metrics and in ListModels.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from sluice import logs
from sluice.clock import Clock
from sluice.metrics import Metrics
from sluice.settings import GuardrailSettings

log = logging.getLogger(__name__)

_P95 = 0.95


class LatencyWindow:
    """The latest latencies of one version: at most ``max_calls``, none older than
    ``window_s`` (seconds on ``clock``)."""

    def __init__(self, *, max_calls: int, window_s: float, clock: Clock) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_calls)
        self._window_s = window_s
        self._clock = clock

    def add(self, seconds: float) -> None:
        self._samples.append((self._clock(), seconds))

    def __len__(self) -> int:
        self._forget_old()
        return len(self._samples)

    def p95(self) -> float | None:
        """The 95th percentile (nearest rank) of the latencies in the window; None when
        it is empty."""
        self._forget_old()
        if not self._samples:
            return None
        ordered = sorted(seconds for _, seconds in self._samples)
        return ordered[math.ceil(_P95 * len(ordered)) - 1]

    def _forget_old(self) -> None:
        horizon = self._clock() - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()


@dataclass(frozen=True, slots=True)
class GuardrailView:
    """A version's guardrail as ListModels shows it."""

    guardrail_ms: float
    tripped: bool
    #: Recent p95 latency (0 when the window is empty) and the calls it is made of.
    p95_ms: float
    samples: int
    slow_calls: int


class Guardrail:
    """One version's guardrail: its window, its slow calls, whether it is tripped."""

    def __init__(
        self,
        key: tuple[str, str, str],
        guardrail_ms: float,
        settings: GuardrailSettings,
        *,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.guardrail_ms = guardrail_ms
        self.tripped = False
        self.slow_calls = 0
        self._key = key
        self._settings = settings
        self._clock = clock
        self._window = LatencyWindow(
            max_calls=settings.window_calls, window_s=settings.window_s, clock=clock
        )
        self._last_probe: float | None = None
        self._p95_s: float | None = None
        self._slow = metrics.guardrail.slow_calls.labels(*key)
        self._p95 = metrics.guardrail.p95_seconds.labels(*key)
        self._tripped = metrics.guardrail.tripped.labels(*key)
        self._tripped.set(0)
        metrics.guardrail.seconds.labels(*key).set(guardrail_ms / 1000)

    def record(self, seconds: float) -> None:
        """One answered call's latency; trips or recovers the version when its p95 says so."""
        if seconds * 1000 > self.guardrail_ms:
            self.slow_calls += 1
            self._slow.inc()
        self._window.add(seconds)
        self._judge()

    def gives_way(self) -> bool:
        """Whether a call should try other candidates first: the version is tripped and
        this call is not its probe (one per ``probe_interval_s``)."""
        if not self.tripped:
            return False
        now = self._clock()
        if self._last_probe is None or now - self._last_probe >= self._settings.probe_interval_s:
            self._last_probe = now
            return False
        return True

    def view(self) -> GuardrailView:
        p95 = self._window.p95()
        return GuardrailView(
            guardrail_ms=self.guardrail_ms,
            tripped=self.tripped,
            p95_ms=0.0 if p95 is None else p95 * 1000,
            samples=len(self._window),
            slow_calls=self.slow_calls,
        )

    def _judge(self) -> None:
        p95 = self._window.p95()
        if p95 is None:
            return
        self._p95.set(p95)
        if len(self._window) < self._settings.min_samples:
            return
        p95_ms = p95 * 1000
        if not self.tripped and p95_ms > self.guardrail_ms:
            self._flip(True, p95_ms)
        elif self.tripped and p95_ms < self._settings.recovery_ratio * self.guardrail_ms:
            self._flip(False, p95_ms)

    def _flip(self, tripped: bool, p95_ms: float) -> None:
        self.tripped = tripped
        self._tripped.set(1 if tripped else 0)
        self._last_probe = self._clock() if tripped else None
        model, version, backend = self._key
        if tripped:
            what = "is over its latency guardrail: calls prefer the next candidate"
        else:
            what = "is back under its latency guardrail (recovered): calls return to it"
        log.log(
            logging.WARNING if tripped else logging.INFO,
            "model %s version %s (%s): p95 %.3f ms %s (guardrail %.3f ms)",
            logs.clip(model),
            logs.clip(version),
            backend,
            p95_ms,
            what,
            self.guardrail_ms,
            extra=logs.fields(
                model=model,
                version=version,
                backend=backend,
                outcome="guardrail_tripped" if tripped else "guardrail_recovered",
                p95_ms=round(p95_ms, 3),
                guardrail_ms=self.guardrail_ms,
            ),
        )


class Guardrails:
    """Every guarded version's ``Guardrail``, made when first asked for with its model's
    current ``latency_guardrail_ms`` (a reload that keeps it keeps the state; one that
    changes it starts afresh)."""

    def __init__(self, settings: GuardrailSettings, *, metrics: Metrics, clock: Clock) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._guards: dict[tuple[str, str, str], Guardrail] = {}

    def get(
        self, guardrail_ms: float | None, model: str, version: str, backend: str
    ) -> Guardrail | None:
        """The version's guardrail, given its model's configured one (None: no guardrail)."""
        key = (model, version, backend)
        guard = self._guards.get(key)
        if guardrail_ms is None:
            if guard is not None:
                del self._guards[key]
                self._metrics.guardrail.tripped.labels(*key).set(0)
            return None
        if guard is None or guard.guardrail_ms != guardrail_ms:
            guard = self._guards[key] = Guardrail(
                key, guardrail_ms, self._settings, metrics=self._metrics, clock=self._clock
            )
        return guard

    def peek(self, model: str, version: str, backend: str) -> Guardrail | None:
        """The version's guardrail if it has served a guarded call (nothing is made)."""
        return self._guards.get((model, version, backend))
