"""The model repository: ``<repo>/<model>/config.yaml`` (optional) and version folders.

A config is validated with pydantic; an error names the file and the field. Whatever the
config leaves out comes from the model file itself: tensors, datatypes, and a dynamic first
dimension, which turns on dynamic batching with the server's defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sluice.answer_config import DegradedConfig, ResponseCacheConfig, known_datatype
from sluice.errors import ConfigError
from sluice.executors.base import DeclaredTensor, FaultConfig
from sluice.executors.capabilities import forceable
from sluice.settings import (
    BatchingSettings,
    FallbackTarget,
    GenerationDtype,
    GenerationSettings,
)
from sluice.tensors import IOSpec, TensorSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"

EXAMPLE_REPOSITORY = Path(__file__).parent / "example_models"
"""The models shipped with Sluice, served when no repository is configured."""

STATE_FOLDER = ".sluice"
"""Run-time state (serving pointers, histories) inside a repository; never a model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class TensorConfig(_Strict):
    name: str
    datatype: str
    """Open Inference Protocol datatype, e.g. FP32, INT64, BYTES."""
    dims: list[int]
    """Shape without the batch dimension; -1 for a variable size."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)

    @field_validator("dims")
    @classmethod
    def _valid_dims(cls, value: list[int]) -> list[int]:
        if any(dim < -1 or dim == 0 for dim in value):
            raise ValueError("dimensions are positive sizes or -1")
        return value


class DynamicBatchingConfig(_Strict):
    max_queue_delay_us: int | None = Field(None, ge=0)
    """Longest wait to grow a batch (default: the server's batching.max_queue_delay_us)."""
    preferred_batch_sizes: list[int] = []
    """Batch sizes that end the wait early."""
    max_queue_size: int | None = Field(None, ge=1)
    """Requests that may wait before new ones are shed (default: the server's)."""


class VersionPolicy(_Strict):
    latest: int | None = Field(None, ge=1)
    """Serve the N highest versions."""
    specific: list[int] | None = None
    """Serve exactly these versions."""
    all: bool = False
    """Serve every version folder."""

    def select(self, versions: list[int]) -> list[int]:
        ordered = sorted(versions)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific)]
        return ordered[-(self.latest or 1) :]


class ShadowConfig(_Strict):
    """Where sampled calls are mirrored after this model answered, to compare the answers."""

    model: str = ""
    """The shadow model (empty: this model, another version of it)."""
    version: str = ""
    """The shadow's version (empty: its serving version)."""
    fraction: float = Field(ge=0, le=1)
    """Share of this model's calls that are mirrored (generation: of its greedy calls)."""
    max_concurrency: int | None = Field(None, ge=1)
    """Mirrors in flight at once (default: the server's shadow.max_concurrency)."""
    budget_s: float | None = Field(None, gt=0)
    """Longest one mirror may take (default: the server's shadow.budget_s)."""

    @model_validator(mode="after")
    def _names_a_target(self) -> ShadowConfig:
        if not (self.model or self.version):
            raise ValueError("name the shadow's model, its version, or both")
        return self


class GenerationModelConfig(_Strict):
    """``generation:`` in a generation model's config.yaml: its own choices, where they
    differ from the server's ``generation`` settings."""

    dtype: GenerationDtype | None = None
    """This model's weights and key/value cache type (default: ``generation.dtype``)."""


def generation_settings(
    server: GenerationSettings, model: GenerationModelConfig | None
) -> GenerationSettings:
    """The generation settings one model loads with: the server's, with its own choices."""
    if model is None or model.dtype is None:
        return server
    return server.model_copy(update={"dtype": model.dtype})


def check_generation(model: GenerationModelConfig | None, *, where: Path, generates: bool) -> None:
    """``ConfigError`` when a tensor model's config chooses a generation ``dtype``."""
    if model is not None and model.dtype is not None and not generates:
        raise ConfigError(
            f"{where}: field 'generation.dtype': this is not a generation model (a causal "
            "language model); its type comes from its file: remove the field"
        )


class ModelConfig(_Strict):
    backend: str | None = None
    """Force a backend (onnxruntime, pytorch, tensorrt) or one rung of the capability ladder
    (e.g. torch-cpu, onnxruntime-cuda); default: the best the machine can run."""
    torch_compile: bool = False
    """Run a PyTorch model through torch.compile, warmed up before it reports ready."""
    max_batch_size: int | None = Field(None, ge=0)
    """Largest batch (0: no batch dimension; default: detected from the model file)."""
    inputs: list[TensorConfig] | None = None
    outputs: list[TensorConfig] | None = None
    dynamic_batching: DynamicBatchingConfig | None = None
    instance_count: int = Field(1, ge=1)
    """Executor instances (sessions) running batches in parallel."""
    version_policy: VersionPolicy = VersionPolicy()
    fallbacks: list[FallbackTarget] = []
    """Where a call goes, in order, when this model fails transiently or its breaker is open."""
    response_cache: ResponseCacheConfig = ResponseCacheConfig()
    """Serve repeated calls from the server's response cache."""
    degraded: DegradedConfig | None = None
    """What the model answers when every candidate failed or is open (none: the error)."""
    latency_guardrail_ms: float | None = Field(None, gt=0)
    """Calls slower than this are slow (counted apart from failures); a version whose recent
    p95 is above it gives way to the next candidate of its chain until it recovers
    (settings ``guardrail.*``). None: no guardrail."""
    faults: FaultConfig | None = None
    """Injected faults (tests, game days)."""
    shadow: ShadowConfig | None = None
    """Mirror a sample of this model's calls to another model or version and compare."""
    generation: GenerationModelConfig | None = None
    """A generation model's own generation choices (a tensor model may not have them)."""

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value is not None and value not in forceable():
            raise ValueError(f"unknown backend '{value}'; use one of {forceable()}")
        return value

    def declared(self, field: Literal["inputs", "outputs"]) -> tuple[DeclaredTensor, ...] | None:
        """The tensors this config lists, as full shapes (for files that name none)."""
        tensors = self.inputs if field == "inputs" else self.outputs
        if tensors is None:
            return None
        batch = () if self.max_batch_size == 0 else (-1,)
        return tuple(DeclaredTensor(t.name, t.datatype, (*batch, *t.dims)) for t in tensors)


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_size: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything the server knows about how to serve one model version."""

    name: str
    version: str
    backend: str
    path: Path
    io: IOSpec
    batching: BatchingPolicy
    instance_count: int
    auto_configured: bool
    #: The capability-ladder rung that loaded it (e.g. ``onnxruntime-cpu``) and why.
    backend_rung: str = ""
    backend_reason: str = ""
    device: str = "cpu"
    #: A generation model: a request may get many responses (Triton's "decoupled").
    decoupled: bool = False
    #: Repeated calls are answered from the response cache (``response_cache.enabled``).
    response_cache: bool = False
    #: What a generation model's weights and key/value cache are in (its config's
    #: ``generation.dtype``, else the server's); empty for a tensor model.
    dtype: str = ""


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ModelConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(top level)'}': {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


def list_versions(model_dir: Path, policy: VersionPolicy) -> list[str]:
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not numbers:
        raise ConfigError(f"{model_dir}: no version folders (expected e.g. {model_dir}/1/)")
    return [str(v) for v in policy.select(numbers)]


def list_models(repository: Path) -> list[str]:
    if not repository.is_dir():
        raise ConfigError(f"model repository {repository} is not a directory")
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def resolve_io(
    config: ModelConfig,
    declared_inputs: tuple[DeclaredTensor, ...],
    declared_outputs: tuple[DeclaredTensor, ...],
    *,
    where: Path,
    default_max_batch: int,
) -> IOSpec:
    """Combine the config with what the model file declares."""
    batchable = all(t.shape and t.shape[0] == -1 for t in (*declared_inputs, *declared_outputs))
    if config.max_batch_size is None:
        max_batch = default_max_batch if batchable else 0
    else:
        max_batch = config.max_batch_size
        if max_batch > 0 and not batchable:
            raise ConfigError(
                f"{where}: field 'max_batch_size': {max_batch} needs a dynamic first "
                "dimension on every input and output, and the model file has none"
            )
    inputs = _resolve_tensors(config.inputs, declared_inputs, max_batch > 0, where, "inputs")
    outputs = _resolve_tensors(config.outputs, declared_outputs, max_batch > 0, where, "outputs")
    return IOSpec(inputs=inputs, outputs=outputs, max_batch_size=max_batch)


def _resolve_tensors(
    configured: list[TensorConfig] | None,
    declared: tuple[DeclaredTensor, ...],
    batched: bool,
    where: Path,
    field: str,
) -> tuple[TensorSpec, ...]:
    from_file = {
        t.name: TensorSpec(t.name, t.datatype, t.shape[1:] if batched else t.shape, t.optional)
        for t in declared
    }
    if configured is None:
        return tuple(from_file.values())
    specs = []
    for index, tensor in enumerate(configured):
        known = from_file.get(tensor.name)
        if known is None:
            raise ConfigError(
                f"{where}: field '{field}.{index}.name': the model has no tensor "
                f"'{tensor.name}' (it has {', '.join(from_file)})"
            )
        if known.datatype != tensor.datatype:
            raise ConfigError(
                f"{where}: field '{field}.{index}.datatype': {tensor.datatype} but the model "
                f"file says {known.datatype}"
            )
        specs.append(TensorSpec(tensor.name, tensor.datatype, tuple(tensor.dims), known.optional))
    return tuple(specs)


def resolve_batching(config: ModelConfig, io: IOSpec, defaults: BatchingSettings) -> BatchingPolicy:
    dynamic = config.dynamic_batching or DynamicBatchingConfig()
    return BatchingPolicy(
        max_batch_size=max(io.max_batch_size, 1),
        max_queue_delay_us=(
            defaults.max_queue_delay_us
            if dynamic.max_queue_delay_us is None
            else dynamic.max_queue_delay_us
        ),
        preferred_batch_sizes=tuple(sorted(dynamic.preferred_batch_sizes)),
        max_queue_size=dynamic.max_queue_size or defaults.max_queue_size,
    )
