"""The metrics of the engine lane (``workers.lane``), part of the server's ``Metrics``:
registered in every server, non-zero only where transport processes send calls through it
(``workers`` above 1)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class LaneMetrics:
    """The lane's gauges and counters, in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "sluice_lane_connections",
            "Transport connections to the engine lane.",
            registry=registry,
        )
        self.calls = Gauge(
            "sluice_lane_calls", "Calls running in the engine through the lane.", registry=registry
        )
        self.refused = Counter(
            "sluice_lane_refused",
            "Lane calls refused before they ran, by reason (calls: over the per-connection "
            "limit; frame: over the frame size limit; malformed: unreadable frame).",
            ["reason"],
            registry=registry,
        )
        self.max_calls_per_connection = Gauge(
            "sluice_lane_max_calls_per_connection",
            "The lane's limit on calls running per connection.",
            registry=registry,
        )
