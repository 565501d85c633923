"""The metrics of the engine lane (``workers.lane``) and of the transport processes, part of
the server's ``Metrics``: registered in every server, non-zero only where transport
processes serve the port (``workers`` above 1).

The transports serve no metrics of their own (the engine's endpoint is the server's one
answer), yet their memory and CPU are the server's too: a caller can make a transport hold
requests the engine never sees. ``TransportProcesses`` reads them from ``/proc`` when
Prometheus scrapes, so nothing is sent between the processes and a transport that is gone
is simply not listed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


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
            "Lane calls refused before they ran, by reason (calls, streams: over the "
            "per-connection limit; frame: over the frame size limit; malformed: unreadable "
            "frame).",
            ["reason"],
            registry=registry,
        )
        self.max_calls_per_connection = Gauge(
            "sluice_lane_max_calls_per_connection",
            "The lane's limit on calls running per connection.",
            registry=registry,
        )
        self.streams = Gauge(
            "sluice_lane_streams",
            "Calls with streamed responses running in the engine through the lane.",
            registry=registry,
        )
        self.max_streams_per_connection = Gauge(
            "sluice_lane_max_streams_per_connection",
            "The lane's limit on calls with streamed responses running per connection.",
            registry=registry,
        )
        self.stream_window_bytes = Gauge(
            "sluice_lane_stream_window_bytes",
            "Response bytes a streaming lane call may send ahead of what its caller read.",
            registry=registry,
        )
        self.stream_waits = Counter(
            "sluice_lane_stream_waits",
            "Times a streaming lane call waited for its caller to read (a full window).",
            registry=registry,
        )
        #: Each transport's memory and CPU (``watch`` gives it the running transports).
        self.transports = TransportProcesses()
        registry.register(self.transports)


class TransportProcesses(Collector):
    """``sluice_transport_resident_bytes`` and ``sluice_transport_cpu_seconds_total`` by
    transport index, for the pids the watched source gives (index -> pid) at each scrape."""

    def __init__(self) -> None:
        self._running: Callable[[], Mapping[int, int]] = dict

    def watch(self, running: Callable[[], Mapping[int, int]]) -> None:
        self._running = running

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        resident = GaugeMetricFamily(
            "sluice_transport_resident_bytes",
            "Resident memory of each transport process (workers above 1).",
            labels=["transport"],
        )
        cpu = CounterMetricFamily(
            "sluice_transport_cpu_seconds",
            "CPU time (user and system) each transport process has used since it started.",
            labels=["transport"],
        )
        for index, pid in sorted(self._running().items()):
            read = _read(pid)
            if read is not None:
                resident.add_metric([str(index)], read[0])
                cpu.add_metric([str(index)], read[1])
        yield resident
        yield cpu


def _read(pid: int) -> tuple[int, float] | None:
    """(resident bytes, CPU seconds) of ``pid``, or None once it has exited."""
    proc = Path(f"/proc/{pid}")
    try:
        pages = int((proc / "statm").read_text().split()[1])
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    return pages * _PAGE, (int(fields[11]) + int(fields[12])) / _TICK
