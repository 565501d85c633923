"""Building a model's registry entry from the repository: its config, the versions its
policy selects (and the serving one, whatever the policy says), the other backends its
fallbacks name, and the choice of the serving version; later, the versions another
replica's promote or rollback asks for."""

from __future__ import annotations

import logging
from pathlib import Path

from sluice.errors import ConfigError, SluiceError
from sluice.lifecycle import Pointer
from sluice.lifecycle_redis import RedisModelState
from sluice.loader import VersionLoader
from sluice.registry.entry import ModelEntry
from sluice.repository import ModelConfig, list_versions, read_config
from sluice.settings import FallbackTarget

log = logging.getLogger(__name__)


class EntryBuilder:
    def __init__(self, loader: VersionLoader, *, repository: Path, replace_failed: bool) -> None:
        self._loader = loader
        self._repository = repository
        self._replace_failed = replace_failed

    async def fill(self, entry: ModelEntry) -> ConfigError | None:
        """Load what the model's folder holds into ``entry``. Returns the error the load
        must end with (the entry replaces the old one all the same: it says what failed),
        or None."""
        try:
            config = read_config(self._repository / entry.name)
            entry.fallbacks = tuple(config.fallbacks)
            entry.shadow = config.shadow
            entry.response_cache = config.response_cache
            entry.degraded = config.degraded
            entry.latency_guardrail_ms = config.latency_guardrail_ms
            versions = list_versions(self._repository / entry.name, config.version_policy)
        except ConfigError as exc:
            entry.failures[""] = exc.message
            return exc
        await self._load_versions(entry, self._with_serving(entry, versions), config)
        entry.choose_serving(replace_failed=self._replace_failed)
        if not entry.versions:
            return ConfigError(
                f"model '{entry.name}' has no loadable version: "
                + "; ".join(f"{v}: {why}" for v, why in entry.failures.items())
            )
        return None

    async def adopt(self, entry: ModelEntry, shared: Pointer) -> None:
        """Serve what another replica's change made the shared pointer say; a version not
        loaded here is loaded and warmed up first (what served here serves meanwhile)."""
        version = shared.serving
        if version and version not in entry.versions and version not in entry.failures:
            await self.add_version(entry, version)
        assert isinstance(entry.state, RedisModelState)
        if version != entry.serving_version:
            log.info("model %s: version %s serves, as set on another replica", entry.name, version)
        entry.state.adopt(shared)

    async def add_version(self, entry: ModelEntry, version: str) -> None:
        """Load one more version into a loaded model's entry, warmed up with a real
        inference before it may serve; a failure is recorded in the entry."""
        try:
            config = read_config(self._repository / entry.name)
            loaded = await self._loader.load(entry.name, version, config)
            await self._loader.warm_up(loaded)
        except SluiceError as exc:
            entry.failures[version] = exc.message
            log.error("model %s version %s failed to load: %s", entry.name, version, exc)
            return
        entry.versions[version] = loaded

    def _with_serving(self, entry: ModelEntry, versions: list[str]) -> list[str]:
        """The versions the policy selects, and the serving one whatever the policy says
        (a failure to find its folder is recorded like a failure to load it)."""
        serving = entry.serving_version
        if not serving or serving in versions:
            return versions
        if (self._repository / entry.name / serving).is_dir():
            return [*versions, serving]
        entry.failures[serving] = f"its folder {self._repository / entry.name / serving} is gone"
        return versions

    async def _load_versions(
        self, entry: ModelEntry, versions: list[str], config: ModelConfig
    ) -> None:
        """Load the versions, and the other backends of them its fallbacks name."""
        for version in versions:
            try:
                entry.versions[version] = await self._loader.load(entry.name, version, config)
            except SluiceError as exc:
                entry.failures[version] = exc.message
                log.error("model %s version %s failed to load: %s", entry.name, version, exc)
        for target in config.fallbacks:
            if target.backend and target.model in ("", entry.name):
                await self._load_alternates(entry, target, config)

    async def _load_alternates(
        self, entry: ModelEntry, target: FallbackTarget, config: ModelConfig
    ) -> None:
        """Load another backend of this model's versions, named by one of its fallbacks."""
        for version in [target.version] if target.version else list(entry.versions):
            try:
                entry.alternates[(version, target.backend)] = await self._loader.load(
                    entry.name, version, config, forced=target.backend
                )
            except SluiceError as exc:
                entry.failures[f"{version}@{target.backend}"] = exc.message
                log.error(
                    "model %s version %s: fallback backend %s failed to load: %s",
                    entry.name,
                    version,
                    target.backend,
                    exc.message,
                )
