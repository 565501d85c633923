"""Verified health: a real test inference against every loaded model version, on an
interval, off the request path.

A version that fails its probe is NOT_SERVING in grpc health, leaves the routing tables
(calls go to its fallbacks) and comes back once a probe passes. Probe inputs are generated
from the input spec: zeros, one row, variable dimensions of size 1. Remote candidates are
asked ``ModelReady`` on the same interval (``routing.remote``); one that is not ready is
passed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sluice.clock import Clock
from sluice.errors import SluiceError
from sluice.loader import ModelVersion
from sluice.registry import ModelRegistry
from sluice.routing.remote import Remotes
from sluice.settings import ProbeSettings
from sluice.tensors import probe_inputs

log = logging.getLogger(__name__)


class HealthProber:
    def __init__(
        self,
        registry: ModelRegistry,
        settings: ProbeSettings,
        clock: Clock,
        *,
        remotes: Remotes | None = None,
    ) -> None:
        self._registry = registry
        self._remotes = remotes
        self._settings = settings
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._settings.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="health-prober")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe_all(self) -> None:
        """Probe every loaded version once, concurrently, and every remote candidate."""
        versions = self._registry.loaded_versions()
        remote = [self._remotes.probe_all(self._settings.timeout_s)] if self._remotes else []
        await asyncio.gather(*(self._probe(version) for version in versions), *remote)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval_s)
            await self.probe_all()

    async def _probe(self, version: ModelVersion) -> None:
        spec = version.spec
        deadline = self._clock() + self._settings.timeout_s
        problem: str | None = None
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                inputs = version.executor.probe_inputs() or probe_inputs(spec.io)
                await version.batcher.infer(inputs, deadline=deadline)
        except TimeoutError:
            problem = f"no answer within {self._settings.timeout_s:.3f}s"
        except SluiceError as exc:
            problem = exc.message
        await self._registry.set_health(spec.name, spec.version, problem)
