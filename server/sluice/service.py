"""The protocol-neutral core: which models are loaded, and running inference on them.

The service holds, per model version, a batcher that holds an executor (made and released by
``loader.VersionLoader``), knows which version of each model serves and records every change
to it (``lifecycle``). Servicers call it with domain requests and get domain results; nothing
here knows about protobuf or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sluice.admission import Ticket
from sluice.batching.dynamic import Clock
from sluice.breaker_state import open_breaker_store
from sluice.errors import (
    BreakerOpenError,
    ConfigError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTooLargeError,
    SluiceError,
    UnsupportedError,
)
from sluice.executors.capabilities import Capabilities, detect
from sluice.executors.causal_lm import generate_text, text_request
from sluice.executors.registry import BackendRegistry
from sluice.generation.request import GenerationRequest
from sluice.lifecycle import Change, ModelState, Pointer
from sluice.lifecycle_redis import PointerFollower, RedisLifecycleStore, RedisModelState
from sluice.loader import ModelVersion, VersionLoader
from sluice.metrics import Metrics
from sluice.repository import (
    EXAMPLE_REPOSITORY,
    STATE_FOLDER,
    ModelConfig,
    ShadowConfig,
    list_models,
    list_versions,
    read_config,
)
from sluice.settings import FallbackTarget, Settings
from sluice.stats import ModelStats
from sluice.tensors import (
    Array,
    InferRequest,
    InferResult,
    InputCheck,
    OutputTensor,
    check_inputs,
    check_requested_outputs,
    decode_checked,
    decode_inputs,
    expected_reply_bytes,
    reply_size,
)
from sluice.tracing import Tracing

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"

#: Called with (model name, serving) whenever a model's readiness changes.
ReadinessListener = Callable[[str, bool], Awaitable[None]]


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

    def described_version(self) -> ModelVersion:
        """The version metadata describes: the serving one, else the highest loaded."""
        found = self.versions.get(self.serving_version)
        return found if found is not None else self.versions[max(self.versions, key=int)]

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


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str
    #: The loaded version behind the row (None when it failed to load or is unloaded).
    loaded: ModelVersion | None = None
    #: This version answers calls that name no version.
    serving: bool = False


class InferenceService:
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
        self._settings = settings
        self._repository = repository
        self._metrics = metrics
        self._capabilities = capabilities or detect(allow_cuda=settings.executor.use_cuda)
        self._clock = clock
        self._loader = VersionLoader(
            settings,
            repository=repository,
            metrics=metrics,
            backends=backends or BackendRegistry.default(),
            capabilities=self._capabilities,
            breaker_store=open_breaker_store(settings.breaker),
            on_breaker_change=self._refresh_soon,
            clock=clock,
            tracing=tracing or Tracing.off(),
        )
        self._models: dict[str, ModelEntry] = {}
        self._states: dict[str, ModelState] = {}
        self._state_root = state_root(settings, repository)
        self._shared: RedisLifecycleStore | None = None
        if settings.lifecycle.redis_url is not None:
            self._shared = RedisLifecycleStore.connect(settings.lifecycle)
        self._listeners: list[ReadinessListener] = []
        self._background: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.started = False

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def repository(self) -> Path:
        return self._repository

    def add_readiness_listener(self, listener: ReadinessListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle ------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model in the repository; one failure never stops the others."""
        for name in list_models(self._repository):
            try:
                await self.load(name)
            except SluiceError as exc:
                log.error("model %s failed to load: %s", name, exc.message)
        self.started = True
        if self._shared is not None:
            self._start_following(self._shared)

    async def load(self, name: str, *, who: str = "sluice", reason: str = "") -> None:
        """(Re)load a model from the repository: every version its policy selects. Loads
        asked for by a caller (not the start-up load) go to the model's history."""
        await self._load(name)
        if who != "sluice":
            self._models[name].state.record(
                "load", from_version="", to_version="", who=who, reason=reason or "reload"
            )

    async def _load(self, name: str) -> None:
        async with self._lock:
            model_dir = self._repository / name
            if not self._in_repository(name):
                raise ModelNotFoundError(
                    f"model '{name}' is not in the repository {self._repository}"
                )
            entry = ModelEntry(name, state=self._state(name))
            try:
                config = read_config(model_dir)
                entry.fallbacks = tuple(config.fallbacks)
                entry.shadow = config.shadow
                versions = list_versions(model_dir, config.version_policy)
            except ConfigError as exc:
                entry.failures[""] = exc.message
                await self._replace(name, entry)
                raise
            for version in self._with_serving(entry, versions):
                try:
                    entry.versions[version] = await self._loader.load(name, version, config)
                except SluiceError as exc:
                    entry.failures[version] = exc.message
                    log.error("model %s version %s failed to load: %s", name, version, exc)
            for target in config.fallbacks:
                if target.backend and target.model in ("", name):
                    await self._load_alternates(entry, target, config)
            self._choose_serving(entry)
            await self._replace(name, entry)
            if not entry.versions:
                raise ConfigError(
                    f"model '{name}' has no loadable version: "
                    + "; ".join(f"{v}: {why}" for v, why in entry.failures.items())
                )

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

    async def unload(self, name: str, *, who: str = "sluice", reason: str = "") -> None:
        """Unload the whole model once its in-flight calls finish (bounded)."""
        async with self._lock:
            if name not in self._models:
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            old = self._models.pop(name)
            await self._notify(name, False)
            await self._close_entry(old)
            if who != "sluice":
                old.state.record(
                    "unload", from_version="", to_version="", who=who, reason=reason or "unload"
                )

    # -- versions while traffic flows -------------------------------------------------

    async def load_version(self, name: str, version: str, *, who: str, reason: str) -> None:
        """Load one more version of a loaded model beside the serving one: warmed up with a
        real inference before it may serve. A failure leaves what serves untouched."""
        async with self._lock:
            entry = self._loaded_entry(name)
            if version in entry.versions:
                return
            if not version.isdigit() or not _is_dir(self._repository / name / version):
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
            await self._notify(name, entry.serving)

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
            await self._notify(name, entry.serving)

    async def promote(self, name: str, version: str, *, who: str, reason: str) -> tuple[str, str]:
        """Make a loaded, healthy version the serving one: (from, to). Calls that already
        chose a version finish on it; every later call gets the new one."""
        async with self._lock:
            entry = self._loaded_entry(name)
            self._check_servable(entry, version)
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
            self._check_servable(entry, target)
            before = entry.serving_version
            entry.state.record(
                "rollback", from_version=before, to_version=target, who=who, reason=reason
            )
            log.info("model %s: rolled back from %s to %s by %s", name, before, target, who)
            return before, target

    def history(self, name: str) -> list[Change]:
        if not self._in_repository(name):
            raise ModelNotFoundError(f"model '{name}' is not in the repository {self._repository}")
        return self._state(name).history

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

    def _loaded_entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model '{name}' is not loaded")
        return entry

    def _check_servable(self, entry: ModelEntry, version: str) -> None:
        loaded = entry.versions.get(version)
        if loaded is None:
            raise ModelNotFoundError(
                f"model '{entry.name}' has no loaded version '{version}'; load it first"
            )
        if version in entry.unhealthy or loaded.breaker.is_open():
            raise ModelNotReadyError(
                f"model '{entry.name}' version {version} is not healthy: "
                f"{entry.unhealthy.get(version, 'its circuit breaker is open')}"
            )

    def _choose_serving(self, entry: ModelEntry) -> None:
        """The first time a model loads, its highest version becomes the serving one. After
        that the pointer decides; when its version cannot serve, the server says so and
        serves another only when ``lifecycle.replace_failed_serving_version`` says to, as a
        promote in the history."""
        pointer = entry.state.pointer
        if not entry.versions or pointer.serving in entry.versions:
            return
        best = max(entry.versions, key=int)
        if not pointer.serving:
            entry.state.record(
                "promote", from_version="", to_version=best, who="sluice", reason="first load"
            )
            return
        why = entry.not_ready_reason()
        if not self._settings.lifecycle.replace_failed_serving_version:
            log.error(
                "model %s: %s; calls that name no version fail until it loads (LoadModel with "
                "its version) or another version is promoted",
                entry.name,
                why,
            )
            return
        entry.state.record(
            "promote",
            from_version=pointer.serving,
            to_version=best,
            who="sluice",
            reason=f"replaces the serving version: {why}",
        )
        log.error("model %s: %s; version %s serves in its place", entry.name, why, best)

    def _state(self, name: str) -> ModelState:
        state = self._states.get(name)
        if state is None and self._shared is not None:
            state = self._states[name] = self._shared.open(name)
        if state is None:
            directory = None if self._state_root is None else self._state_root / name
            try:
                state = ModelState.open(directory)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"model '{name}': its state in {directory} is unreadable: {exc}"
                ) from exc
            self._states[name] = state
        return state

    async def close(self) -> None:
        """Unload everything (the last step of a drain)."""
        for task in list(self._background):
            task.cancel()
        for name in list(self._models):
            await self.unload(name)
        if self._shared is not None:
            self._shared.close()

    # -- serving pointers shared by replicas (lifecycle.redis_url) ------------------------

    def _start_following(self, store: RedisLifecycleStore) -> None:
        follower = PointerFollower(
            store,
            served=lambda: {name: e.state.pointer for name, e in self._models.items()},
            on_newer=self._adopt_shared,
        )
        task = asyncio.get_running_loop().create_task(follower.run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _adopt_shared(self, name: str, shared: Pointer) -> None:
        """Serve what another replica promoted or rolled back to; a version not loaded
        here is loaded and warmed up first (what served here serves meanwhile)."""
        async with self._lock:
            entry = self._models.get(name)
            if entry is None or shared.seq <= entry.state.pointer.seq:
                return
            version = shared.serving
            if version and version not in entry.versions and version not in entry.failures:
                try:
                    config = read_config(self._repository / name)
                    loaded = await self._loader.load(name, version, config)
                    await self._loader.warm_up(loaded)
                    entry.versions[version] = loaded
                except SluiceError as exc:
                    entry.failures[version] = exc.message
                    log.error("model %s version %s failed to load: %s", name, version, exc)
            assert isinstance(entry.state, RedisModelState)
            if version != entry.serving_version:
                log.info("model %s: version %s serves, as set on another replica", name, version)
            entry.state.adopt(shared)
            await self._notify(name, entry.serving)

    async def _replace(self, name: str, entry: ModelEntry) -> None:
        old = self._models.get(name)
        self._models[name] = entry
        await self._notify(name, entry.serving)
        if old is not None:
            await self._close_entry(old)

    async def _close_entry(self, entry: ModelEntry) -> None:
        for version in (*entry.versions.values(), *entry.alternates.values()):
            await self._loader.close(version)

    def _refresh_soon(self, name: str) -> None:
        """A breaker changed state (synchronously, inside a call): update health after it."""
        task = asyncio.get_running_loop().create_task(self._refresh(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, name: str) -> None:
        entry = self._models.get(name)
        if entry is not None:
            await self._notify(name, entry.serving)

    async def _notify(self, name: str, ready: bool) -> None:
        for listener in self._listeners:
            await listener(name, ready)

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

    # -- lookups --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Start-up loading finished and the required models (or, with none named, at least
        one model) can infer now."""
        if not self.started:
            return False
        required = self._settings.required_models
        if required:
            return all(name in self._models and self._models[name].ready for name in required)
        return any(entry.ready for entry in self._models.values())

    def loaded_versions(self) -> list[ModelVersion]:
        return [v for entry in self._models.values() for v in entry.versions.values()]

    async def set_health(self, name: str, version: str, problem: str | None) -> None:
        """Record a health probe's verdict (None: passed); readiness follows it."""
        entry = self._models.get(name)
        if entry is None or version not in entry.versions:
            return  # unloaded meanwhile
        was_serving = entry.serving
        if problem is None:
            if entry.unhealthy.pop(version, None) is not None:
                log.info("model %s version %s passes its health probe again", name, version)
        elif version not in entry.unhealthy:
            log.error("model %s version %s failed its health probe: %s", name, version, problem)
            entry.unhealthy[version] = problem
        self._metrics.model_ready.labels(name, version).set(0 if problem else 1)
        if entry.serving != was_serving:
            await self._notify(name, entry.serving)

    def fallbacks(self, name: str) -> tuple[FallbackTarget, ...]:
        entry = self._models.get(name)
        return entry.fallbacks if entry is not None else ()

    def shadow(self, name: str) -> ShadowConfig | None:
        """Where a sample of the model's calls is mirrored (None: nowhere)."""
        entry = self._models.get(name)
        return entry.shadow if entry is not None else None

    def has_model(self, name: str) -> bool:
        return name in self._models

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def lookup(self, name: str, version: str = "") -> ModelVersion:
        """A loaded version, healthy or not (for metadata, config and statistics)."""
        entry = self._models.get(name)
        if entry is not None and entry.versions and not version:
            return entry.described_version()
        if entry is not None and version in entry.versions:
            return entry.versions[version]
        return self.get(name, version)

    def get(self, name: str, version: str = "", backend: str = "") -> ModelVersion:
        """The version that serves a call: loaded and passing its health probe; with
        ``backend``, that backend of it (one a fallback asked to load)."""
        model = self._primary(name, version)
        spec = model.spec
        if not backend or backend in (spec.backend, spec.backend_rung):
            return model
        alternate = self._models[name].alternates.get((spec.version, backend))
        if alternate is None:
            raise ModelNotFoundError(
                f"model '{name}' version {spec.version} has no '{backend}' backend loaded "
                "(name it in a fallback of the model's config to load it)"
            )
        return alternate

    def _primary(self, name: str, version: str) -> ModelVersion:
        entry = self._models.get(name)
        if entry is None:
            if self._in_repository(name):
                raise ModelNotReadyError(
                    f"model '{name}' is in the repository but not loaded; load it "
                    "(RepositoryModelLoad) or call another model"
                )
            raise ModelNotFoundError(
                f"unknown model '{name}'; loaded: {', '.join(self.model_names()) or 'none'}"
            )
        if not version:
            if not entry.ready:
                raise ModelNotReadyError(f"model '{name}' is not ready: {entry.not_ready_reason()}")
            return entry.versions[entry.serving_version]
        found = entry.versions.get(version)
        if found is not None and version in entry.unhealthy:
            raise ModelNotReadyError(
                f"model '{name}' version {version} failed its health probe: "
                f"{entry.unhealthy[version]}"
            )
        if found is None:
            if version in entry.failures:
                raise ModelNotReadyError(
                    f"model '{name}' version {version} failed to load: {entry.failures[version]}"
                )
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}'; loaded versions: "
                f"{', '.join(sorted(entry.versions, key=int)) or 'none'}"
            )
        return found

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except SluiceError:
            return False
        return True

    def generation_model(self, name: str, version: str = "", backend: str = "") -> ModelVersion:
        """The version that serves a generation: as ``get``, and a generation model."""
        model = self.get(name, version, backend)
        if model.generator is None:
            raise UnsupportedError(
                f"model '{name}' does not generate text (it is a {model.spec.backend} tensor "
                "model); call ModelInfer"
            )
        return model

    def is_generation_model(self, name: str, version: str = "") -> bool:
        try:
            return self.lookup(name, version).generator is not None
        except SluiceError:
            return False

    def text_generation_request(self, request: InferRequest) -> tuple[GenerationRequest, bool]:
        """A generation model's tensor request (``text_input``, ``max_tokens``, ...) as a
        generation request, and whether the caller asked for a stream of chunks."""
        model = self.lookup(request.model, request.version)
        inputs = decode_inputs(request, model.spec.io)
        text = text_request(
            inputs, default_max_new_tokens=self._settings.generation.default_max_new_tokens
        )
        generation = GenerationRequest(
            model=request.model,
            version=request.version,
            prompt=text.prompt,
            params=text.params,
            id=request.id,
        )
        return generation, text.stream

    def ensure_can_serve(self, name: str, version: str = "", backend: str = "") -> None:
        """Fail fast when the model's backend breaker is open (before any queueing)."""
        model = self.get(name, version, backend)
        if model.breaker.is_open():
            raise BreakerOpenError(
                f"model '{name}' version {model.spec.version}: backend {model.spec.backend} "
                "is failing and its circuit breaker is open; retry later"
            )

    def index(self) -> list[IndexEntry]:
        """Every model in the repository, one row per version (or per failure)."""
        rows: list[IndexEntry] = []
        for name in list_models(self._repository):
            entry = self._models.get(name)
            if entry is None:
                rows.append(IndexEntry(name, "", UNAVAILABLE, "unloaded"))
                continue
            serving = entry.serving_version
            for version in sorted(entry.versions, key=int):
                why = entry.unhealthy.get(version)
                rows.append(
                    IndexEntry(
                        name,
                        version,
                        READY if why is None else UNAVAILABLE,
                        "" if why is None else f"failed its health probe: {why}",
                        entry.versions[version],
                        serving=version == serving,
                    )
                )
            for version, why in sorted(entry.failures.items()):
                if version == serving:
                    why = (
                        "the serving version failed to load (calls that name no version fail "
                        f"until it loads or another version is promoted): {why}"
                    )
                rows.append(IndexEntry(name, version, UNAVAILABLE, why))
        return rows

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, str, ModelStats]]:
        if name:
            if version:
                return [(name, version, self.lookup(name, version).stats)]
            entry = self._models.get(name)
            if entry is None:
                raise ModelNotFoundError(f"unknown model '{name}'")
            entries = [entry]
        else:
            entries = [self._models[n] for n in self.model_names()]
        return [
            (entry.name, v, entry.versions[v].stats)
            for entry in entries
            for v in sorted(entry.versions, key=int)
        ]

    def _in_repository(self, name: str) -> bool:
        """A plain folder name in the repository (never a path that leaves it)."""
        return _plain_name(name) and _is_dir(self._repository / name)

    # -- inference ------------------------------------------------------------------------

    async def infer(
        self, request: InferRequest, *, deadline: float | None, ticket: Ticket | None = None
    ) -> InferResult:
        """Validate, weigh, queue, run and return one request; ``deadline`` is on the
        service clock. The reply's size (from the output shapes) is added to the call's
        admission ``ticket`` before the request is queued."""
        model = self.get(request.model, request.version, request.backend)
        io = model.spec.io
        checked = check_inputs(request, io)
        wanted = check_requested_outputs(request, io)
        message = self._settings.max_message_bytes
        limit = message - min(REPLY_OVERHEAD_BYTES, message // 8)
        reply_bytes = expected_reply_bytes(io, wanted, checked.rows)
        _check_reply_size(reply_bytes, limit, model.spec.name, known=True)
        if ticket is not None:
            ticket.need(work_bytes=checked.decoded_bytes + reply_bytes)
        inputs = await _decode(request, checked)
        started = self._clock()
        model.enter()
        try:
            if model.generator is not None:
                with model.breaker.calling():
                    outputs = await generate_text(
                        model.generator,
                        inputs,
                        default_max_new_tokens=self._settings.generation.default_max_new_tokens,
                        deadline=deadline,
                        ticket=ticket,
                    )
                model.stats.record_unbatched(queue_s=0.0, infer_s=self._clock() - started)
            else:
                outputs = await model.batcher.infer(inputs, deadline=deadline)
            _check_reply_size(
                reply_size(outputs[name] for name in wanted), limit, model.spec.name, known=False
            )
        except BaseException:
            model.stats.record_end(ok=False, seconds=self._clock() - started)
            raise
        finally:
            model.leave()
        model.stats.record_end(ok=True, seconds=self._clock() - started)
        datatypes = {spec.name: spec.datatype for spec in io.outputs}
        return InferResult(
            model=model.spec.name,
            version=model.spec.version,
            backend=model.spec.backend,
            id=request.id,
            outputs=[OutputTensor(name, datatypes[name], outputs[name]) for name in wanted],
        )


def _plain_name(name: str) -> bool:
    """A name that can only mean a folder directly inside the repository."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(character in name for character in ("/", "\\", "\0"))
    )


def _is_dir(path: Path) -> bool:
    """``path.is_dir()`` that says no, instead of raising, for names the file system
    refuses (too long, undecodable)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


REPLY_OVERHEAD_BYTES = 64 * 1024
"""Room left in a reply message for everything but the output tensors' contents (at most
an eighth of ``max_message_bytes``)."""

OFF_LOOP_DECODE_BYTES = 256 * 1024
"""Requests carrying more tensor bytes than this (or decoding more than this into Python
objects) are decoded in a worker thread: decoding BYTES and typed contents is Python work,
and a big request must not stall the event loop (a thread hands the GIL back every few
milliseconds)."""


async def _decode(request: InferRequest, checked: InputCheck) -> dict[str, Array]:
    if max(checked.payload_bytes, checked.decoded_bytes) <= OFF_LOOP_DECODE_BYTES:
        return decode_checked(request)
    return await asyncio.to_thread(decode_checked, request)


def _check_reply_size(size: int, limit: int, model: str, *, known: bool) -> None:
    if size <= limit:
        return
    when = "its output shapes say the reply would be" if known else "the reply is"
    raise RequestTooLargeError(
        f"model '{model}': {when} {size} bytes, more than the {limit} a reply may carry "
        "(max_message_bytes); send fewer rows or request fewer outputs"
    )


def state_root(settings: Settings, repository: Path) -> Path | None:
    """Where serving pointers and histories live: the configured directory, else
    ``.sluice/`` in a configured model repository; the bundled examples keep them in memory
    (the package's folder is no place for run-time state)."""
    if settings.lifecycle.state_dir is not None:
        return settings.lifecycle.state_dir
    if repository.resolve() == EXAMPLE_REPOSITORY.resolve():
        return None
    return repository / STATE_FOLDER
