"""The control plane: which models and versions are loaded, which version serves, and every
change to that (load, unload, promote, rollback, rescan), recorded in each model's history.

``ModelRegistry`` is the ``ModelTable`` (its reads) plus the changes. Versions are built
and released by ``loader.VersionLoader``; serving pointers and histories live in
``lifecycle.ModelState``. Readiness listeners hear of every model whose readiness may have
changed (a load, an unload, a health probe's verdict, a breaker's state change).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from sluice.breaker_state import open_breaker_store
from sluice.clock import Clock
from sluice.errors import ConfigError, ModelNotFoundError, SluiceError
from sluice.executors.capabilities import Capabilities, detect
from sluice.executors.registry import BackendRegistry
from sluice.lifecycle import Change, Pointer
from sluice.loader import VersionLoader
from sluice.metrics import Metrics
from sluice.registry.building import EntryBuilder
from sluice.registry.entry import ModelEntry
from sluice.registry.readiness import Readiness, ReadinessListener
from sluice.registry.states import ModelStates
from sluice.registry.table import ModelTable, is_dir
from sluice.repository import (
    list_models,
    list_versions,
    read_config,
)
from sluice.settings import Settings
from sluice.tracing import Tracing

log = logging.getLogger(__name__)


class ModelRegistry(ModelTable):
    def __init__(
        self,
        settings: Settings,
        *,
        repository: Path,
        metrics: Metrics,
        backends: BackendRegistry | None = None,
        capabilities: Capabilities | None = None,
        clock: Clock = time.monotonic,
        tracing: Tracing | None = None,
    ) -> None:
        super().__init__(repository, required_models=settings.required_models)
        self._settings = settings
        self._metrics = metrics
        self.capabilities = capabilities or detect(allow_cuda=settings.executor.use_cuda)
        loader = VersionLoader(
            settings,
            repository=repository,
            metrics=metrics,
            backends=backends or BackendRegistry.default(),
            capabilities=self.capabilities,
            breaker_store=open_breaker_store(settings.breaker),
            on_breaker_change=self._refresh_soon,
            clock=clock,
            tracing=tracing or Tracing.off(),
        )
        self._loader = loader
        self._builder = EntryBuilder(
            loader,
            repository=repository,
            replace_failed=settings.lifecycle.replace_failed_serving_version,
        )
        self._states = ModelStates.from_settings(settings, repository)
        self._readiness = Readiness()
        self._lock = asyncio.Lock()

    def add_readiness_listener(self, listener: ReadinessListener) -> None:
        self._readiness.add(listener)

    # -- whole models -------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model in the repository; one failure never stops the others."""
        for name in list_models(self._repository):
            try:
                await self.load(name)
            except SluiceError as exc:
                log.error("model %s failed to load: %s", name, exc.message)
        self.started = True
        following = self._states.following(
            served=lambda: {name: e.state.pointer for name, e in self._models.items()},
            on_newer=self._adopt_shared,
        )
        if following is not None:  # serving pointers shared by replicas (lifecycle.redis_url)
            self._readiness.in_background(following)

    async def load(self, name: str, *, who: str | None = None, reason: str = "") -> None:
        """(Re)load a model from the repository: every version its policy selects, and the
        serving one. A load a caller asked for (``who``: the admin) goes to the model's
        history; the server's own start-up load does not."""
        await self._load(name)
        if who is not None:
            self._models[name].state.record(
                "load", from_version="", to_version="", who=who, reason=reason or "reload"
            )

    async def unload(self, name: str, *, who: str | None = None, reason: str = "") -> None:
        """Unload the whole model once its in-flight calls finish (bounded); recorded in
        its history when a caller (``who``) asked for it."""
        async with self._lock:
            if name not in self._models:
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            old = self._models.pop(name)
            await self._readiness.notify(name, False)
            await self._close_entry(old)
            if who is not None:
                old.state.record(
                    "unload", from_version="", to_version="", who=who, reason=reason or "unload"
                )

    async def close(self) -> None:
        """Unload everything (the last step of a drain)."""
        self._readiness.stop()
        for name in list(self._models):
            await self.unload(name)
        self._states.close()

    async def _load(self, name: str) -> None:
        async with self._lock:
            if not self.in_repository(name):
                raise ModelNotFoundError(
                    f"model '{name}' is not in the repository {self._repository}"
                )
            entry = ModelEntry(name, state=self._states.get(name))
            failure = await self._builder.fill(entry)
            await self._replace(name, entry)
            if failure is not None:
                raise failure

    # -- versions while traffic flows ---------------------------------------------------

    async def load_version(self, name: str, version: str, *, who: str, reason: str) -> None:
        """Load one more version of a loaded model beside the serving one: warmed up with a
        real inference before it may serve. A failure leaves what serves untouched."""
        async with self._lock:
            entry = self._loaded_entry(name)
            if version in entry.versions:
                return
            if not version.isdigit() or not is_dir(self._repository / name / version):
                raise ModelNotFoundError(
                    f"model '{name}' has no version folder '{version}' in {self._repository}"
                )
            try:
                config = read_config(self._repository / name)
                loaded = await self._loader.load(name, version, config)
                await self._loader.warm_up(loaded)
            except SluiceError as exc:
                entry.failures[version] = exc.message
                entry.state.record(
                    "load_failed", from_version="", to_version=version, who=who, reason=exc.message
                )
                raise
            entry.failures.pop(version, None)
            entry.versions[version] = loaded
            entry.state.record("load", from_version="", to_version=version, who=who, reason=reason)
            await self._readiness.notify(name, entry.serving)

    async def unload_version(self, name: str, version: str, *, who: str, reason: str) -> None:
        """Take a version out of service, wait for its in-flight calls, release it."""
        async with self._lock:
            entry = self._loaded_entry(name)
            loaded = entry.versions.get(version)
            if loaded is None:
                raise ModelNotFoundError(f"model '{name}' has no loaded version '{version}'")
            if version == entry.serving_version:
                raise ConfigError(
                    f"model '{name}' version {version} is the serving version: promote another "
                    "version first, or unload the whole model"
                )
            del entry.versions[version]
            entry.unhealthy.pop(version, None)
            await self._loader.close(loaded)
            entry.state.record(
                "unload", from_version=version, to_version="", who=who, reason=reason
            )
            await self._readiness.notify(name, entry.serving)

    async def promote(self, name: str, version: str, *, who: str, reason: str) -> tuple[str, str]:
        """Make a loaded, healthy version the serving one: (from, to). Calls that already
        chose a version finish on it; every later call gets the new one."""
        async with self._lock:
            entry = self._loaded_entry(name)
            entry.servable(version)
            before = entry.serving_version
            entry.state.record(
                "promote", from_version=before, to_version=version, who=who, reason=reason
            )
            log.info("model %s: version %s promoted (was %s) by %s", name, version, before, who)
            return before, version

    async def rollback(self, name: str, *, who: str, reason: str) -> tuple[str, str]:
        """Return to the version that served before the last promote: (from, to)."""
        async with self._lock:
            entry = self._loaded_entry(name)
            previous = entry.state.pointer.previous
            if not previous:
                raise ConfigError(f"model '{name}' has no earlier serving version to roll back to")
            target = previous[-1]
            entry.servable(target)
            before = entry.serving_version
            entry.state.record(
                "rollback", from_version=before, to_version=target, who=who, reason=reason
            )
            log.info("model %s: rolled back from %s to %s by %s", name, before, target, who)
            return before, target

    async def _adopt_shared(self, name: str, shared: Pointer) -> None:
        """Serve what another replica promoted or rolled back to; a version not loaded
        here is loaded and warmed up first (what served here serves meanwhile)."""
        async with self._lock:
            entry = self._models.get(name)
            if entry is None or shared.seq <= entry.state.pointer.seq:
                return
            await self._builder.adopt(entry, shared)
            await self._readiness.notify(name, entry.serving)

    def history(self, name: str) -> list[Change]:
        if not self.in_repository(name):
            raise ModelNotFoundError(f"model '{name}' is not in the repository {self._repository}")
        return self._states.get(name).history

    async def rescan(self, *, who: str) -> tuple[list[str], list[str]]:
        """Load new models and new version folders (beside the serving ones; nothing is
        promoted): what loaded and what failed ("model/version: why")."""
        loaded: list[str] = []
        failed: list[str] = []
        for name in list_models(self._repository):
            if name not in self._models:
                try:
                    await self.load(name)
                    loaded += [f"{name}/{v}" for v in self._models[name].versions]
                except SluiceError as exc:
                    failed.append(f"{name}: {exc.message}")
                continue
            config = read_config(self._repository / name)
            wanted = list_versions(self._repository / name, config.version_policy)
            for version in [v for v in wanted if v not in self._models[name].versions]:
                try:
                    await self.load_version(name, version, who=who, reason="repository rescan")
                    loaded.append(f"{name}/{version}")
                except SluiceError as exc:
                    failed.append(f"{name}/{version}: {exc.message}")
        return loaded, failed

    # -- health -------------------------------------------------------------------------

    async def set_health(self, name: str, version: str, problem: str | None) -> None:
        """Record a health probe's verdict (None: passed); readiness follows it."""
        entry = self._models.get(name)
        if entry is None or version not in entry.versions:
            return  # unloaded meanwhile
        was_serving = entry.serving
        entry.record_health(version, problem)
        self._metrics.model_ready.labels(name, version).set(0 if problem else 1)
        if entry.serving != was_serving:
            await self._readiness.notify(name, entry.serving)

    def _refresh_soon(self, name: str) -> None:
        """A breaker changed state (synchronously, inside a call): update health after it."""
        self._readiness.in_background(self._refresh(name))

    async def _refresh(self, name: str) -> None:
        entry = self._models.get(name)
        if entry is not None:
            await self._readiness.notify(name, entry.serving)

    # -- helpers ------------------------------------------------------------------------

    def _loaded_entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model '{name}' is not loaded")
        return entry

    async def _replace(self, name: str, entry: ModelEntry) -> None:
        old = self._models.get(name)
        self._models[name] = entry
        await self._readiness.notify(name, entry.serving)
        if old is not None:
            await self._close_entry(old)

    async def _close_entry(self, entry: ModelEntry) -> None:
        for version in (*entry.versions.values(), *entry.alternates.values()):
            await self._loader.close(version)
