"""Shared fixtures: a real Sluice server on 127.0.0.1, port 0, on the test's event loop."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sluice.app import EXAMPLE_REPOSITORY
from sluice.executors.registry import BackendRegistry
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.settings import Settings
from sluice.tracing import Tracing
from sluice.transport.server import SluiceServer, create_server
from tests import toolchains
from tests.certs import Certificates, make_certificates

REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A monotonic clock tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningServer:
    server: SluiceServer
    metrics: Metrics
    settings: Settings

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def service(self) -> ModelRegistry:
        return self.server.registry


StartServer = Callable[..., Awaitable[RunningServer]]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``toolchain(...)`` skip (or fail, where required) without those tools."""
    for mark in item.iter_markers("toolchain"):
        toolchains.require(*mark.args)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A test CA with server and client certificates (tests/certs.py), made once."""
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def example_repository(tmp_path: Path) -> Path:
    """A private copy of the example model repository that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(EXAMPLE_REPOSITORY, target)
    return target


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start servers with settings overrides; all are drained when the test ends."""
    started: list[RunningServer] = []

    async def start(
        *,
        repository: Path = EXAMPLE_REPOSITORY,
        clock: Callable[[], float] = time.monotonic,
        backends: BackendRegistry | None = None,
        tracing: Tracing | None = None,
        **overrides: Any,
    ) -> RunningServer:
        settings = Settings.model_validate(
            {"grpc_port": 0, "metrics_port": None, "model_repository": repository, **overrides}
        )
        metrics = Metrics()
        registry = ModelRegistry(
            settings,
            repository=repository,
            metrics=metrics,
            backends=backends,
            clock=clock,
            tracing=tracing,
        )
        server = await create_server(
            settings, registry, metrics=metrics, clock=clock, tracing=tracing
        )
        await registry.load_all()
        await server.mark_started()
        running = RunningServer(server=server, metrics=metrics, settings=settings)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.server.drain(0)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    """The example models, default settings."""
    return await start_server()


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Server processes a test starts; any still running when it ends (a failed test) is
    killed, so no server outlives its test."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
