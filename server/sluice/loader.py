"""Building and releasing model versions: the capability ladder's choice of backend, the
executor, its breaker and its batcher (and, for generation models, the engine the
executor starts), the warm-up inference before a version may serve, and releasing all of
it once the version's in-flight calls have finished.

``registry.ModelRegistry`` decides which versions are loaded and which one serves; this
module only knows how to make one and how to let it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sluice.answer_config import check_degraded, check_response_cache
from sluice.batching.dynamic import DynamicBatcher
from sluice.breaker import BackendBreaker
from sluice.breaker_state import BreakerStore
from sluice.clock import Clock
from sluice.errors import ConfigError, SluiceError
from sluice.executors.base import EngineOptions, Executor, FaultConfig, LoadOptions
from sluice.executors.capabilities import BackendPlan, Candidate, Capabilities
from sluice.executors.faults import FaultyExecutor
from sluice.executors.registry import BackendRegistry
from sluice.generation.engine import GenerationEngine, SchedulerLimits
from sluice.metrics import Metrics
from sluice.priority import Priorities
from sluice.repository import (
    ModelConfig,
    ModelSpec,
    check_generation,
    generation_settings,
    resolve_batching,
    resolve_io,
)
from sluice.settings import Settings
from sluice.stats import ModelStats
from sluice.tensors import probe_inputs
from sluice.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelVersion:
    spec: ModelSpec
    executor: Executor
    batcher: DynamicBatcher
    breaker: BackendBreaker
    stats: ModelStats
    #: Generation models: the engine every generation of the version runs through.
    engine: GenerationEngine | None = None
    #: Calls and streams running on this version; an unload waits for ``idle``.
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until no call runs on this version; False when some still do."""
        if self.inflight == 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.idle.wait()
        return self.inflight == 0


class VersionLoader:
    """Makes and releases ``ModelVersion``s for one repository."""

    def __init__(
        self,
        settings: Settings,
        *,
        repository: Path,
        metrics: Metrics,
        backends: BackendRegistry,
        capabilities: Capabilities,
        breaker_store: BreakerStore,
        on_breaker_change: Callable[[str], None],
        clock: Clock,
        tracing: Tracing,
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._metrics = metrics
        self._backends = backends
        self._capabilities = capabilities
        self._breaker_store = breaker_store
        self._on_breaker_change = on_breaker_change
        self._clock = clock
        self._tracing = tracing

    async def load(
        self, name: str, version: str, config: ModelConfig, *, forced: str | None = None
    ) -> ModelVersion:
        """Load one version with the config its model was loaded with (read once per load)."""
        model_dir = self._repository / name
        forced, forced_by = (
            (forced, f"a fallback in {model_dir / 'config.yaml'}")
            if forced
            else (config.backend, str(model_dir / "config.yaml"))
            if config.backend is not None
            else (self._settings.force_backend, "SLUICE_FORCE_BACKEND")
        )
        plan = self._backends.plan(
            model_dir / version, self._capabilities, forced=forced, forced_by=forced_by
        )
        options = LoadOptions(
            instance_count=config.instance_count,
            settings=self._settings.executor,
            declared_inputs=config.declared("inputs"),
            declared_outputs=config.declared("outputs"),
            generation=generation_settings(self._settings.generation, config.generation),
            compile=config.torch_compile,
        )
        load_started = self._clock()
        executor, candidate = await self._load_first(plan, options, where=f"{name}/{version}")
        self._metrics.model_load_seconds.labels(name, candidate.backend).observe(
            self._clock() - load_started
        )
        executor, engine = self._start(executor, candidate, config, f"{name}/{version}")
        try:
            spec = self._spec(
                name,
                version,
                config,
                executor,
                candidate,
                decoupled=bool(engine),
                dtype=options.generation.dtype,
            )
            where, generates = model_dir / "config.yaml", bool(engine)
            check_degraded(config.degraded, spec.io, where=where, generates=generates)
            check_response_cache(config.response_cache, where=where, generates=generates)
            check_generation(config.generation, where=where, generates=generates)
        except ConfigError:
            await executor.close()
            raise
        log.info(
            "loaded model %s version %s: backend %s on %s, max_batch_size %d%s",
            name,
            version,
            spec.backend,
            executor.device,
            spec.io.max_batch_size,
            " (dynamic batching from the file's dynamic first dimension)"
            if spec.auto_configured and spec.io.batched
            else "",
        )
        return self._assemble(spec, executor, engine)

    def _start(
        self, executor: Executor, candidate: Candidate, config: ModelConfig, name: str
    ) -> tuple[Executor, GenerationEngine | None]:
        """Start the executor's engine (generation backends), with the model's faults
        injected into it, or into the executor itself (tensor backends)."""
        faults = _faults_for(config.faults, candidate)
        options = EngineOptions(
            name=name, limits=self._engine_limits(), clock=self._clock, faults=faults
        )
        engine = executor.start_engine(options)
        if engine is None and faults is not None:
            log.warning("model %s: injecting faults %s", name, faults)
            executor = FaultyExecutor(executor, faults)
        return executor, engine

    def _spec(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        executor: Executor,
        candidate: Candidate,
        *,
        decoupled: bool,
        dtype: str,
    ) -> ModelSpec:
        """What the version serves: the config checked against the executor's tensors
        (``dtype``: the generation type it was loaded with, kept for a generation model)."""
        io = resolve_io(
            config,
            tuple(executor.inputs),
            tuple(executor.outputs),
            where=self._repository / name / "config.yaml",
            default_max_batch=self._settings.batching.max_batch_size,
        )
        return ModelSpec(
            name=name,
            version=version,
            backend=candidate.backend,
            backend_rung=candidate.rung,
            backend_reason=candidate.reason,
            device=executor.device,
            path=candidate.path,
            io=io,
            batching=resolve_batching(config, io, self._settings.batching),
            # A generation model takes as many whole-text calls at once as it runs sequences.
            instance_count=(
                self._settings.generation.max_running_sequences
                if decoupled
                else config.instance_count
            ),
            auto_configured=config.inputs is None,
            decoupled=decoupled,
            dtype=dtype if decoupled else "",
            response_cache=(
                config.response_cache.enabled
                and not decoupled
                and self._settings.cache.max_bytes > 0
            ),
        )

    def _engine_limits(self) -> SchedulerLimits:
        limits = self._settings.generation
        return SchedulerLimits(
            max_running_sequences=limits.max_running_sequences,
            max_tokens_in_flight=limits.max_tokens_in_flight,
            max_waiting=limits.max_waiting_requests,
            max_buffered_chunks=limits.max_buffered_chunks,
            pushback_ms=self._settings.admission.pushback_ms,
            priorities=Priorities(self._settings.priority),
        )

    async def _load_first(
        self, plan: BackendPlan, options: LoadOptions, *, where: str
    ) -> tuple[Executor, Candidate]:
        """Load the ladder's best candidate that loads; log the choice and its reason."""
        failures = []
        for candidate in plan.candidates:
            factory = self._backends.factory(candidate.backend)
            placed = dataclasses.replace(options, device=candidate.device)
            try:
                executor = await asyncio.to_thread(factory.load, candidate.path, placed)
            except SluiceError as exc:
                log.warning("model %s: %s did not load: %s", where, candidate.rung, exc.message)
                failures.append(f"{candidate.rung}: {exc.message}")
                continue
            log.info(
                "model %s: backend %s (%s); %s",
                where,
                candidate.rung,
                candidate.reason,
                plan.describe(),
            )
            return executor, candidate
        raise ConfigError(f"model {where}: no candidate backend loaded: " + "; ".join(failures))

    def _assemble(
        self, spec: ModelSpec, executor: Executor, engine: GenerationEngine | None = None
    ) -> ModelVersion:
        label = f"{spec.name}/{spec.version}/{spec.backend}"

        def on_change(_old: str, new: str) -> None:
            self._metrics.breaker_changed(spec.name, spec.version, spec.backend, new)
            self._on_breaker_change(spec.name)

        breaker = BackendBreaker(
            label,
            self._settings.breaker,
            clock=self._clock,
            on_change=on_change,
            store=self._breaker_store,
        )
        self._metrics.set_breaker_state(spec.name, spec.version, spec.backend, breaker.state)
        stats = ModelStats()
        batcher = DynamicBatcher(
            name=f"{spec.name}/{spec.version}",
            executor=executor,
            policy=spec.batching,
            batched=spec.io.batched,
            breaker=breaker,
            observer=self._metrics.batch_observer(spec.name, spec.version, stats=stats),
            instance_count=spec.instance_count,
            pushback_ms=self._settings.admission.pushback_ms,
            max_execution_s=self._settings.executor.max_batch_execution_s,
            clock=self._clock,
            tracing=self._tracing,
            priorities=Priorities(self._settings.priority),
            span_attributes={
                "sluice.model": spec.name,
                "sluice.model.version": spec.version,
                "sluice.backend": spec.backend,
            },
        )
        batcher.start()
        self._metrics.model_ready.labels(spec.name, spec.version).set(1)
        return ModelVersion(
            spec=spec,
            executor=executor,
            batcher=batcher,
            breaker=breaker,
            stats=stats,
            engine=engine,
        )

    async def warm_up(self, loaded: ModelVersion) -> None:
        """A real test inference before the version may serve."""
        inputs = loaded.executor.probe_inputs() or probe_inputs(loaded.spec.io)
        timeout_s = self._settings.lifecycle.warm_up_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await loaded.batcher.infer(inputs, deadline=self._clock() + timeout_s)
        except (TimeoutError, SluiceError) as exc:
            await self.close(loaded)
            why = exc.message if isinstance(exc, SluiceError) else f"no answer in {timeout_s}s"
            raise ConfigError(
                f"model '{loaded.spec.name}' version {loaded.spec.version} failed its warm-up "
                f"inference: {why}"
            ) from exc

    async def close(self, version: ModelVersion) -> None:
        """Release a version taken out of service, once its in-flight calls finish (bounded
        by ``lifecycle.unload_timeout_s``)."""
        spec = version.spec
        if not await version.wait_idle(self._settings.lifecycle.unload_timeout_s):
            log.warning(
                "model %s version %s: %d calls still running after %.0fs; releasing it anyway",
                spec.name,
                spec.version,
                version.inflight,
                self._settings.lifecycle.unload_timeout_s,
            )
        await version.batcher.close()
        await version.executor.close()
        self._metrics.model_ready.labels(spec.name, spec.version).set(0)
        release_memory()


def _faults_for(faults: FaultConfig | None, candidate: Candidate) -> FaultConfig | None:
    """The model's configured faults, when they apply to the backend it loaded on."""
    if faults is None or faults.mode == "none":
        return None
    if faults.backends and not {candidate.backend, candidate.rung} & set(faults.backends):
        return None
    return faults


def freeze_heap() -> None:
    """Collect, then move everything alive (modules, settings, the loaded models) out of the
    cyclic collector's sight (``gc.freeze``). It lives as long as the process, yet every
    full collection walked it again: with the libraries a server imports that is tens of
    milliseconds on the event loop, each time enough objects have survived young
    collections (the objects of the calls in flight at each one count towards it).
    Objects are still freed by their reference counts; ``release_memory`` thaws them."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Hand freed memory back to the system after an unload (glibc keeps freed arenas
    otherwise, and the process would never shrink back). A frozen heap (``freeze_heap``)
    is thawed first, so the unloaded version's cycles are collected, and what stays alive
    is frozen again."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
