"""The one small interface every backend implements.

An executor is loaded from one model file, reports the tensors the file declares, runs one
batch at a time per instance off the event loop, and is closed when its version unloads.
A generation backend also starts a ``GenerationEngine`` (``start_engine``), through which
every generation of its version runs; tensor backends have none. Library exceptions are
translated here into Sluice's error tree, chained with ``from``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from sluice.clock import Clock
from sluice.generation.engine import GenerationEngine, SchedulerLimits
from sluice.settings import ExecutorSettings, GenerationSettings
from sluice.tensors import Array


@dataclass(frozen=True, slots=True)
class DeclaredTensor:
    """A tensor as the model file declares it: full shape, -1 for any symbolic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    """An input a request may leave out."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    instance_count: int
    settings: ExecutorSettings
    declared_inputs: tuple[DeclaredTensor, ...] | None = None
    """Inputs the model's config declares (full shapes), for files that carry no tensor
    metadata (TorchScript); None when the config lists none."""
    declared_outputs: tuple[DeclaredTensor, ...] | None = None
    """Outputs the model's config declares, as ``declared_inputs``."""
    device: str | None = None
    """Where the capability ladder placed the model (``cpu``, ``cuda``, ``cuda:1``);
    None lets the backend choose."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Settings of generation models (causal LMs)."""
    compile: bool = False
    """Compile the model where the backend can (``torch.compile``) and warm it up before
    the load returns, so the version reports ready only once compiled."""


class FaultConfig(BaseModel):
    """``faults:`` in a model's config.yaml (injected by ``executors.faults``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    mode: Literal["none", "fail", "hang", "slow", "dead"] = "none"
    """fail: a transient backend error; hang: never answers (until the call gives up);
    slow: answers after ``delay_ms``; dead: the backend reports it can run nothing more."""
    probability: float = Field(1.0, ge=0, le=1)
    """Share of batches (generation models: of generations) the fault hits."""
    delay_ms: float = Field(0.0, ge=0)
    """Added latency for ``slow``."""
    backends: list[str] = []
    """Backends (or ladder rungs) the fault applies to; empty: all of the model's."""
    seed: int | None = None
    """Seed for the draw (None: a fresh random sequence)."""
    after_tokens: int = Field(0, ge=0)
    """Generation models: a hit generation fails (or hangs) once it has made this many
    tokens (0: before its first). The draw is per generation, not per decode step."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What a generation backend's engine is started with."""

    name: str
    """``model/version``, for logs and errors."""
    limits: SchedulerLimits
    clock: Clock
    faults: FaultConfig | None = None
    """Faults to inject into the engine's generations (``executors.faults.FaultyEngine``)."""


class Executor(abc.ABC):
    """Runs batches for one model version."""

    backend: ClassVar[str]

    @property
    @abc.abstractmethod
    def inputs(self) -> Sequence[DeclaredTensor]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> Sequence[DeclaredTensor]: ...

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it runs, for logs and the API (e.g. ``cpu``, ``cuda:0``)."""

    @abc.abstractmethod
    async def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run one batch; returns every output. Raises ``SluiceError`` subclasses only."""

    def probe_inputs(self) -> dict[str, Array] | None:
        """Inputs for a health probe, where the backend knows better than zeros (None)."""
        return None

    def start_engine(self, options: EngineOptions) -> GenerationEngine | None:
        """A generation backend makes and starts its engine here, on the running event loop
        (the executor's ``run`` uses it too); tensor backends have none."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the backend's memory; the executor is unusable afterwards."""


class ExecutorFactory(abc.ABC):
    """Knows which files a backend loads and how."""

    backend: ClassVar[str]
    filenames: ClassVar[tuple[str, ...]]

    def find(self, version_dir: Path) -> Path | None:
        for name in self.filenames:
            candidate = version_dir / name
            if candidate.is_file():
                return candidate
        return None

    @abc.abstractmethod
    def load(self, path: Path, options: LoadOptions) -> Executor:
        """Load ``path`` (blocking; called in a worker thread)."""
