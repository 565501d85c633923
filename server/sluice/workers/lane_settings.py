"""The engine lane's settings and metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field


class LaneSettings(BaseModel):
    """The engine lane between the transport workers and the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_calls_per_connection: int = Field(4096, ge=1)
    """Calls one transport connection may have running in the engine at once; more are
    refused with RESOURCE_EXHAUSTED (admission sheds long before this in normal use)."""
    max_metadata_bytes: int = Field(64 * 1024, ge=1024)
    """Bytes a call frame may carry beyond its message (method, metadata, identity); with
    the server's ``max_message_bytes``, the largest frame the engine reads."""
    deadline_grace_s: float = Field(0.1, ge=0.0)
    """How long after a call's deadline the engine cancels a call still running (its
    deadline hook normally ends it first, with DEADLINE_EXCEEDED and a message that says
    which budget ran out; this stops handlers that have no such hook)."""
    shared_min_bytes: int = Field(1024 * 1024, ge=0)
    """Requests this large or larger cross in shared memory (``/dev/shm``) instead of the
    socket, sparing the engine's event loop the copy through it (0: never)."""
    max_backlog_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    """Reply bytes waiting for a connection's peer to read them beyond which the engine
    reads no more calls from it (until half have gone); the client likewise stops sending
    calls while this many call bytes wait."""


class LaneMetrics:
    """The lane's gauges and counters, in the server's registry."""

    def __init__(self, registry: CollectorRegistry, settings: LaneSettings) -> None:
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
        limit = Gauge(
            "sluice_lane_max_calls_per_connection",
            "The lane's limit on calls running per connection.",
            registry=registry,
        )
        limit.set(settings.max_calls_per_connection)
