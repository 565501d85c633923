"""The latency guardrail's metrics (``routing.guardrail``), part of the server's ``Metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GuardrailMetrics:
    """Each guarded version's guardrail, slow calls, recent p95 and whether it is tripped."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Gauge(
            "sluice_guardrail_seconds",
            "Latency guardrail of a model version (latency_guardrail_ms in its config).",
            ["model", "version", "backend"],
            registry=registry,
        )
        self.slow_calls = Counter(
            "sluice_guardrail_slow_calls",
            "Calls slower than their version's latency guardrail (soft failures, counted "
            "apart from the breaker's failures).",
            ["model", "version", "backend"],
            registry=registry,
        )
        self.p95_seconds = Gauge(
            "sluice_guardrail_p95_seconds",
            "Recent p95 latency of a guarded model version (guardrail.window_* settings).",
            ["model", "version", "backend"],
            registry=registry,
        )
        self.tripped = Gauge(
            "sluice_guardrail_tripped",
            "1 while a version's recent p95 is over its latency guardrail and calls prefer "
            "the next candidate of its chain.",
            ["model", "version", "backend"],
            registry=registry,
        )
