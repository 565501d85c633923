"""Prometheus metrics, each server with its own registry (tests get their own too).

Names follow Prometheus conventions: a ``sluice_`` prefix, base units (seconds), and
counters exported with ``_total``. ``deploy/grafana/sluice.json`` charts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sluice.guardrail_metrics import GuardrailMetrics
from sluice.lane_metrics import LaneMetrics
from sluice.remote_metrics import RemoteMetrics
from sluice.stats import BatchRun, ModelStats

_SUB_SECOND = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
_LATENCY_BUCKETS = (*_SUB_SECOND, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
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
        self.inflight_bytes = Gauge(
            "sluice_inflight_bytes",
            "Bytes held by admitted calls: requests as received plus their replies' sizes.",
            registry=r,
        )
        self.inflight_tokens = Gauge(
            "sluice_inflight_tokens",
            "Generation tokens held by admitted calls: prompt plus max_new_tokens.",
            registry=r,
        )
        self.stream_pending_bytes = Gauge(
            "sluice_stream_pending_bytes",
            "Bytes held by open ModelStreamInfer streams: requests read and not yet answered, "
            "replies not yet written (each stream holds at most stream.max_pending_bytes).",
            registry=r,
        )
        self.admission_limit = Gauge(
            "sluice_admission_limit",
            "Admission budgets in force, by resource (requests, bytes, tokens) and scope "
            "(server, tenant); 0: no limit.",
            ["resource", "scope"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth",
            "Requests waiting in a batcher queue.",
            ["model", "version"],
            registry=r,
        )
        self.priority_queue_depth = Gauge(
            "sluice_priority_queue_depth",
            "Requests waiting in a batcher queue, by priority level (1: most urgent).",
            ["model", "version", "level"],
            registry=r,
        )
        self.shed = Counter(
            "sluice_shed",
            "Calls shed under overload (admission or a full queue), by priority level.",
            ["level"],
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
            "Calls answered by a fallback candidate, by the name called and the target that "
            "answered (model/version).",
            ["model", "target"],
            registry=r,
        )
        self.fallback_skipped = Counter(
            "sluice_fallback_skipped",
            "Candidates of a call's chain passed over, by the name called, the candidate "
            "(model[/version][@backend]) and why: breaker, health, deadline, budget.",
            ["model", "target", "reason"],
            registry=r,
        )
        self.remote = RemoteMetrics(r)
        self.lane = LaneMetrics(r)
        self.cache_hits = Counter(
            "sluice_cache_hits", "Response cache hits (degraded ones too).", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "sluice_cache_misses", "Response cache misses.", ["model"], registry=r
        )
        self.cache_evictions = Counter(
            "sluice_cache_evictions", "Cached answers evicted, by model.", ["model"], registry=r
        )
        self.cache_bytes = Gauge(
            "sluice_cache_bytes", "Bytes the response cache holds.", registry=r
        )
        self.cache_entries = Gauge("sluice_cache_entries", "Answers cached.", registry=r)
        self.cache_shared_errors = Counter(
            "sluice_cache_shared_errors",
            "Failed Redis cache operations.",
            ["operation"],
            registry=r,
        )
        self.degraded_responses = Counter(
            "sluice_degraded_responses",
            "Degraded-tier answers, by source.",
            ["model", "source"],
            registry=r,
        )
        self.model_ready = Gauge(
            "sluice_model_ready",
            "1 when the model version can infer now.",
            ["model", "version"],
            registry=r,
        )
        self.model_inflight = Gauge(
            "sluice_model_inflight_requests",
            "Requests queued or running on a model version.",
            ["model", "version"],
            registry=r,
        )
        self.open_streams = Gauge(
            "sluice_open_streams",
            "Streaming calls open now (a drain waits for them).",
            registry=r,
        )
        self.transport_processes = Gauge(
            "sluice_transport_processes",
            "Transport processes serving the gRPC port (workers above 1).",
            registry=r,
        )
        self.transport_restarts = Counter(
            "sluice_transport_restarts",
            "Transport processes started again after one exited.",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sluice_breaker_transitions",
            "Backend breaker state changes, by the state entered.",
            ["model", "version", "backend", "state"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "sluice_model_load_duration_seconds",
            "Time to load one model version on a backend.",
            ["model", "backend"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "sluice_time_to_first_token_seconds",
            "Generation: from the call's arrival to its first output token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "sluice_time_per_output_token_seconds",
            "Generation: mean time between output tokens after the first, per request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "sluice_generated_tokens",
            "Generation: output tokens produced.",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sluice_prompt_tokens",
            "Generation: prompt tokens processed.",
            ["model"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "sluice_shadow_requests",
            "Shadow traffic by the shadowed model: calls mirrored, compared, failed on the "
            "shadow (error, budget or mismatched outputs), and skipped (over the concurrency).",
            ["model", "outcome"],
            registry=r,
        )
        self.shadow_max_abs_diff = Gauge(
            "sluice_shadow_max_abs_diff",
            "Tensor models: the largest absolute difference between primary and shadow outputs.",
            ["model"],
            registry=r,
        )
        self.shadow_max_rel_diff = Gauge(
            "sluice_shadow_max_rel_diff",
            "Tensor models: the largest relative difference, |a - b| / max(|a|, |b|).",
            ["model"],
            registry=r,
        )
        self.shadow_exact_matches = Counter(
            "sluice_shadow_exact_matches",
            "Generation models: greedy calls whose shadow made exactly the same tokens.",
            ["model"],
            registry=r,
        )
        self.shadow_tokens = Counter(
            "sluice_shadow_tokens",
            "Generation models: token positions compared (the longer output's length).",
            ["model"],
            registry=r,
        )
        self.shadow_agreeing_tokens = Counter(
            "sluice_shadow_agreeing_tokens",
            "Generation models: token positions where primary and shadow made the same token.",
            ["model"],
            registry=r,
        )
        self.guardrail = GuardrailMetrics(r)

    def batch_observer(self, model: str, version: str, *, stats: ModelStats) -> BatchMetrics:
        """What one version's batcher reports to: these metrics and its ``stats``."""
        return BatchMetrics(self, model, version, stats)

    def set_breaker_state(self, model: str, version: str, backend: str, state: str) -> None:
        self.breaker_state.labels(model, version, backend).set(_BREAKER_STATES.get(state, -1))

    def breaker_changed(self, model: str, version: str, backend: str, state: str) -> None:
        """A breaker entered ``state``: its gauge follows and the transition is counted."""
        self.set_breaker_state(model, version, backend, state)
        self.breaker_transitions.labels(model, version, backend, state).inc()

    def generation_observer(self, model: str) -> GenerationMetrics:
        return GenerationMetrics(self, model)

    def serve_http(self, host: str, port: int) -> MetricsEndpoint:
        """Serve ``/metrics`` for this registry on ``host:port`` (0: any free port) from a
        background thread."""
        server, _thread = start_http_server(port, host, self.registry)
        return MetricsEndpoint(server)


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server."""

    server: WSGIServer

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BatchMetrics:
    """What one model version's batcher measures goes here: the Prometheus metrics (label
    children bound once) and the version's statistics (the ModelStatistics RPC)."""

    __slots__ = (
        "_batch",
        "_compute",
        "_depth",
        "_inflight",
        "_levels",
        "_queue",
        "metrics",
        "model",
        "stats",
        "version",
    )

    def __init__(self, metrics: Metrics, model: str, version: str, stats: ModelStats) -> None:
        self.metrics = metrics
        self.stats = stats
        self.model = model
        self.version = version
        self._depth = metrics.queue_depth.labels(model, version)
        self._inflight = metrics.model_inflight.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)
        self._compute = metrics.compute_seconds.labels(model, version)
        self._queue = metrics.queue_seconds.labels(model, version)
        self._levels: dict[int, Any] = {}

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def inflight(self, delta: int) -> None:
        self._inflight.inc(delta)

    def batch_done(self, run: BatchRun) -> None:
        self.stats.record_run(run)
        self._batch.observe(run.size)
        self._compute.observe(run.infer_s)
        for waited in run.queue_s:
            self._queue.observe(waited)

    def dropped(self, reason: str) -> None:
        self.stats.dropped += 1
        self.metrics.dropped.labels(self.model, self.version, reason).inc()

    def level_depth(self, level: int, depth: int) -> None:
        gauge = self._levels.get(level)
        if gauge is None:  # levels are the configured ones: a handful
            gauge = self._levels[level] = self.metrics.priority_queue_depth.labels(
                self.model, self.version, str(level)
            )
        gauge.set(depth)

    def shed(self, level: int) -> None:
        self.metrics.shed.labels(str(level)).inc()


@dataclass(frozen=True, slots=True)
class GenerationMetrics:
    """What token generation reports for one model: call these from the generation path.

    ``first_token`` once per request when its first token is sent (seconds since the call
    arrived); ``finished`` once when it ends, with the output tokens it produced and the
    seconds from its first token to its last (time per output token = that / (tokens - 1)).
    """

    metrics: Metrics
    model: str

    def prompt(self, tokens: int) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.metrics.time_to_first_token.labels(self.model).observe(seconds)

    def finished(self, *, tokens: int, decode_s: float) -> None:
        self.metrics.generated_tokens.labels(self.model).inc(tokens)
        if tokens > 1:
            self.metrics.time_per_output_token.labels(self.model).observe(decode_s / (tokens - 1))
