"""The metrics of remote candidates (``routing.remote``), part of the server's ``Metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RemoteMetrics:
    """The metrics of remote candidates, in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_remote_requests",
            "Calls to remote candidates, by endpoint, model and outcome (a gRPC status code "
            "name; LIMIT: refused here, remote.max_inflight_per_endpoint reached).",
            ["endpoint", "model", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "sluice_remote_request_duration_seconds",
            "Latency of calls to remote candidates, as this server sees it.",
            ["endpoint", "model"],
            registry=registry,
        )
        self.inflight = Gauge(
            "sluice_remote_inflight_requests",
            "Calls in flight to a remote endpoint (at most remote.max_inflight_per_endpoint).",
            ["endpoint"],
            registry=registry,
        )
        self.limit = Gauge(
            "sluice_remote_limit",
            "The remote settings in force: max_inflight_per_endpoint, max_reply_bytes.",
            ["limit"],
            registry=registry,
        )
        self.ready = Gauge(
            "sluice_remote_ready",
            "1 when the last probe found the remote candidate ready (ModelReady), else 0.",
            ["endpoint", "model", "version"],
            registry=registry,
        )
