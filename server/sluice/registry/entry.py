"""One model in the registry: its loaded versions, the serving pointer, what failed and
why, and the rules that pick the version a call gets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sluice.answer_config import DegradedConfig, ResponseCacheConfig
from sluice.errors import ModelNotFoundError, ModelNotReadyError
from sluice.lifecycle import SERVER, ModelState
from sluice.loader import ModelVersion
from sluice.repository import ModelSpec, ShadowConfig
from sluice.settings import FallbackTarget
from sluice.stats import ModelStats

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a version (or a failure) and its state."""

    name: str
    version: str
    state: str
    reason: str
    #: The loaded version's spec (None when it failed to load or is unloaded).
    spec: ModelSpec | None = None
    #: Its breaker's state (closed, half-open, open; "" when not loaded).
    breaker_state: str = ""
    #: This version answers calls that name no version.
    serving: bool = False


@dataclass(eq=False)
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    #: Why the model or one of its versions failed to load ("" key: the model as a whole).
    failures: dict[str, str] = field(default_factory=dict)
    #: Where calls go when this model fails transiently (from its config).
    fallbacks: tuple[FallbackTarget, ...] = ()
    #: Where a sample of its calls is mirrored (from its config).
    shadow: ShadowConfig | None = None
    #: Whether repeated calls are answered from the response cache (from its config).
    response_cache: ResponseCacheConfig = field(default_factory=ResponseCacheConfig)
    #: What it answers when every candidate failed or is open (from its config).
    degraded: DegradedConfig | None = None
    #: Calls slower than this are slow; a version with a slow p95 gives way (from its config).
    latency_guardrail_ms: float | None = None
    #: Other backends of a version, loaded because a fallback names them: (version, backend).
    alternates: dict[tuple[str, str], ModelVersion] = field(default_factory=dict)
    #: Loaded versions that failed their last health probe, with the reason.
    unhealthy: dict[str, str] = field(default_factory=dict)
    #: The serving pointer and history (kept across reloads of the model).
    state: ModelState = field(default_factory=lambda: ModelState(None))

    @property
    def serving_version(self) -> str:
        """The version calls without a version get (the serving pointer's)."""
        return self.state.pointer.serving

    @property
    def ready(self) -> bool:
        """The serving version can infer now (loaded and passing its health probe)."""
        version = self.serving_version
        return version in self.versions and version not in self.unhealthy

    @property
    def serving(self) -> bool:
        """What the model's health says: its serving version is ready and its breaker is not
        open (an open breaker half-opens on the next call or probe)."""
        return self.ready and not self.versions[self.serving_version].breaker.is_open()

    # -- which version a call gets ------------------------------------------------------

    def version(self, version: str, *, healthy: bool) -> ModelVersion:
        """``version`` (empty: the serving one). ``healthy``: it must be able to infer now;
        otherwise any loaded version will do, and no version means the serving one or,
        when that is not loaded, the highest loaded (what metadata describes)."""
        if not healthy:
            if not version and self.versions:
                found = self.versions.get(self.serving_version)
                return found if found is not None else self.versions[max(self.versions, key=int)]
            if version in self.versions:
                return self.versions[version]
        if not version:
            if not self.ready:
                raise ModelNotReadyError(
                    f"model '{self.name}' is not ready: {self.not_ready_reason()}"
                )
            return self.versions[self.serving_version]
        found = self.versions.get(version)
        if found is not None and version in self.unhealthy:
            raise ModelNotReadyError(
                f"model '{self.name}' version {version} failed its health probe: "
                f"{self.unhealthy[version]}"
            )
        if found is None:
            if version in self.failures:
                raise ModelNotReadyError(
                    f"model '{self.name}' version {version} failed to load: "
                    f"{self.failures[version]}"
                )
            raise ModelNotFoundError(
                f"model '{self.name}' has no version '{version}'; loaded versions: "
                f"{', '.join(sorted(self.versions, key=int)) or 'none'}"
            )
        return found

    def backend(self, model: ModelVersion, backend: str) -> ModelVersion:
        """``backend`` of a loaded version: itself, or one a fallback asked to load."""
        spec = model.spec
        if backend in (spec.backend, spec.backend_rung):
            return model
        alternate = self.alternates.get((spec.version, backend))
        if alternate is None:
            raise ModelNotFoundError(
                f"model '{self.name}' version {spec.version} has no '{backend}' backend loaded "
                "(name it in a fallback of the model's config to load it)"
            )
        return alternate

    def not_ready_reason(self) -> str:
        """Why calls that name no version cannot be served now."""
        version = self.serving_version
        if version in self.unhealthy:
            why = self.unhealthy[version]
            return f"its serving version {version} failed its health probe: {why}"
        if version in self.failures:
            return f"its serving version {version} failed to load: {self.failures[version]}"
        if version:
            return f"its serving version {version} is not loaded"
        return "; ".join(f"{v or 'config'}: {why}" for v, why in self.failures.items()) or (
            "no version loaded"
        )

    def servable(self, version: str) -> ModelVersion:
        """A loaded, healthy version a promote or rollback may make the serving one."""
        loaded = self.versions.get(version)
        if loaded is None:
            raise ModelNotFoundError(
                f"model '{self.name}' has no loaded version '{version}'; load it first"
            )
        if version in self.unhealthy or loaded.breaker.is_open():
            raise ModelNotReadyError(
                f"model '{self.name}' version {version} is not healthy: "
                f"{self.unhealthy.get(version, 'its circuit breaker is open')}"
            )
        return loaded

    # -- changes ------------------------------------------------------------------------

    def choose_serving(self, *, replace_failed: bool) -> None:
        """The first time a model loads, its highest version becomes the serving one. After
        that the pointer decides; when its version cannot serve, the server says so and
        serves another only when ``replace_failed`` (``lifecycle.
        replace_failed_serving_version``) says to, as a promote in the history."""
        pointer = self.state.pointer
        if not self.versions or pointer.serving in self.versions:
            return
        best = max(self.versions, key=int)
        if not pointer.serving:
            self.state.record(
                "promote", from_version="", to_version=best, who=SERVER, reason="first load"
            )
            return
        why = self.not_ready_reason()
        if not replace_failed:
            log.error(
                "model %s: %s; calls that name no version fail until it loads (LoadModel with "
                "its version) or another version is promoted",
                self.name,
                why,
            )
            return
        self.state.record(
            "promote",
            from_version=pointer.serving,
            to_version=best,
            who=SERVER,
            reason=f"replaces the serving version: {why}",
        )
        log.error("model %s: %s; version %s serves in its place", self.name, why, best)

    def record_health(self, version: str, problem: str | None) -> None:
        """A health probe's verdict on a loaded version (None: passed)."""
        if problem is None:
            if self.unhealthy.pop(version, None) is not None:
                log.info("model %s version %s passes its health probe again", self.name, version)
        elif version not in self.unhealthy:
            log.error(
                "model %s version %s failed its health probe: %s", self.name, version, problem
            )
            self.unhealthy[version] = problem

    # -- reading ------------------------------------------------------------------------

    def index_rows(self) -> list[IndexEntry]:
        """One row per loaded version, then one per failure."""
        rows: list[IndexEntry] = []
        serving = self.serving_version
        for version in sorted(self.versions, key=int):
            why = self.unhealthy.get(version)
            loaded = self.versions[version]
            rows.append(
                IndexEntry(
                    self.name,
                    version,
                    READY if why is None else UNAVAILABLE,
                    "" if why is None else f"failed its health probe: {why}",
                    spec=loaded.spec,
                    breaker_state=loaded.breaker.state,
                    serving=version == serving,
                )
            )
        for version, why in sorted(self.failures.items()):
            if version == serving:
                why = (
                    "the serving version failed to load (calls that name no version fail "
                    f"until it loads or another version is promoted): {why}"
                )
            rows.append(IndexEntry(self.name, version, UNAVAILABLE, why))
        return rows

    def statistics(self) -> list[tuple[str, str, ModelStats]]:
        return [(self.name, v, self.versions[v].stats) for v in sorted(self.versions, key=int)]
