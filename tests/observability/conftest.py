"""Fixtures: a real OTLP collector, tracing built from the OTEL_* environment, a scrape."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sluice.settings import TracingSettings
from sluice.tracing import Tracing
from tests.observability.collector import Collector

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)

MakeTracing = Callable[..., Tracing]


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean OTEL_* environment the test sets as it needs (restored afterwards)."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    running = await Collector().start()
    yield running
    await running.stop()


@pytest.fixture
async def make_tracing(otel_env: pytest.MonkeyPatch) -> AsyncIterator[MakeTracing]:
    """Tracing exactly as ``sluice serve`` builds it, from OTEL_* variables; shut down after."""
    built: list[Tracing] = []

    def make(endpoint: str, **variables: str) -> Tracing:
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        otel_env.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        otel_env.setenv("OTEL_SERVICE_NAME", "sluice-test")
        for name, value in variables.items():
            otel_env.setenv(name, value)
        tracing = Tracing.from_environment(TracingSettings(flush_timeout_s=5.0))
        built.append(tracing)
        return tracing

    yield make
    for tracing in built:
        await tracing.shutdown()


@pytest.fixture
async def tracing(make_tracing: MakeTracing, collector: Collector) -> Tracing:
    return make_tracing(collector.endpoint)


Scrape = Callable[[int], Awaitable[str]]


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


@pytest.fixture
def scrape() -> Scrape:
    """GET /metrics from the real endpoint (in a thread: the server runs on this loop)."""

    async def get(port: int) -> str:
        return await asyncio.to_thread(_get, port)

    return get
