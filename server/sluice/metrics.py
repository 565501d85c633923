"""Prometheus metrics, each server with its own registry (tests get their own too)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_requests",
            "Calls by method, model and gRPC status code.",
            ["method", "model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "sluice_request_duration_seconds",
            "End-to-end call latency inside the server.",
            ["method", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "sluice_queue_duration_seconds",
            "Time requests waited in a batcher queue.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "sluice_compute_duration_seconds",
            "Executor time per batch.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sluice_batch_size",
            "Rows per executor run.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "sluice_inflight_requests",
            "Calls admitted and not yet finished.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth",
            "Requests waiting in a batcher queue.",
            ["model", "version"],
            registry=r,
        )
        self.rejected = Counter(
            "sluice_rejected_requests",
            "Calls refused before running, by reason.",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "sluice_dropped_requests",
            "Queued requests dropped before execution (caller gone, deadline passed, queue full).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sluice_breaker_state",
            "Backend breaker state: 0 closed, 1 half-open, 2 open.",
            ["model", "version", "backend"],
            registry=r,
        )
        self.retries = Counter(
            "sluice_retries",
            "Attempts after the first, by the name called.",
            ["model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sluice_fallbacks",
            "Calls answered by a fallback candidate, by name and target.",
            ["model", "target"],
            registry=r,
        )
        self.model_ready = Gauge(
            "sluice_model_ready",
            "1 when the model version can infer now.",
            ["model", "version"],
            registry=r,
        )

    def batch_observer(self, model: str, version: str) -> BatchMetrics:
        return BatchMetrics(self, model, version)

    def set_breaker_state(self, model: str, version: str, backend: str, state: str) -> None:
        self.breaker_state.labels(model, version, backend).set(_BREAKER_STATES.get(state, -1))


@dataclass(frozen=True, slots=True)
class BatchMetrics:
    """The batcher's view of the metrics for one model version."""

    metrics: Metrics
    model: str
    version: str

    def queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth.labels(self.model, self.version).set(depth)

    def batch_done(self, *, size: int, queue_s: list[float], compute_s: float) -> None:
        m = self.metrics
        m.batch_size.labels(self.model, self.version).observe(size)
        m.compute_seconds.labels(self.model, self.version).observe(compute_s)
        queue = m.queue_seconds.labels(self.model, self.version)
        for waited in queue_s:
            queue.observe(waited)

    def dropped(self, reason: str) -> None:
        self.metrics.dropped.labels(self.model, self.version, reason).inc()
