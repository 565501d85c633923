"""What this machine can run, detected once at start, and the ladder that picks a backend.

``detect()`` imports the installed libraries and asks them what they offer: versions, CUDA
devices (through torch when it is built with CUDA, else ONNX Runtime's providers), ONNX
Runtime's execution providers and whether ``torch.compile`` can generate code. It queries,
never allocates or runs anything on a GPU.

The ladder is data: an ordered list of rungs, each naming a backend, the device it puts the
model on and what it needs from the machine. ``rank_backends`` walks it for one version
folder: a forced backend (the model config's ``backend`` or the server's setting) keeps only
its own rungs; otherwise every rung whose needs are met and whose backend found a model file
is a candidate, best first, each with the reason it was chosen or passed over. Registered
backends the ladder does not know (plugins, test doubles) come after its rungs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import platform
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from sluice.errors import ConfigError

log = logging.getLogger(__name__)

GPU_PROVIDERS: Final = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The libraries and devices a backend may use. Tests build one by hand."""

    python: str = field(default_factory=platform.python_version)
    torch: str | None = None
    """torch version (None: not installed)."""
    torch_cuda: str | None = None
    """CUDA version torch was built with (None: a CPU-only build, or no torch)."""
    onnxruntime: str | None = None
    ort_providers: tuple[str, ...] = ()
    """ONNX Runtime's execution providers in this build, in its order of preference."""
    tensorrt: str | None = None
    cuda_available: bool = False
    """A CUDA device can be used (torch's word when it has CUDA, else ONNX Runtime's)."""
    cuda_devices: tuple[str, ...] = ()
    """Device names, when torch can list them."""
    cuda_device_count: int = 0
    """Number of devices torch sees (0 when only ONNX Runtime's providers tell of CUDA)."""
    torch_compile: bool = False
    """``torch.compile`` can generate code here (a C++ compiler, or triton on CUDA)."""

    @property
    def torch_on_cuda(self) -> bool:
        return self.torch_cuda is not None and self.cuda_available

    @property
    def ort_gpu_providers(self) -> tuple[str, ...]:
        return tuple(name for name in self.ort_providers if name in GPU_PROVIDERS)

    def without_cuda(self) -> Capabilities:
        """The same machine with CUDA turned off by configuration."""
        return dataclasses.replace(self, cuda_available=False, cuda_devices=(), cuda_device_count=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for the CLI and the API."""
        plain: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            plain[item.name] = list(value) if isinstance(value, tuple) else value
        return plain


def detect(*, allow_cuda: bool = True) -> Capabilities:
    """Ask the installed libraries what this machine offers (once, at start)."""
    torch = _optional("torch")
    ort = _optional("onnxruntime")
    trt = _optional("tensorrt")
    providers = tuple(ort.get_available_providers()) if ort is not None else ()
    torch_cuda = torch.version.cuda if torch is not None else None
    cuda, devices = _cuda_devices(torch if torch_cuda is not None else None, providers)
    found = Capabilities(
        torch=_version(torch),
        torch_cuda=torch_cuda,
        onnxruntime=_version(ort),
        ort_providers=providers,
        tensorrt=_version(trt),
        cuda_available=cuda,
        cuda_devices=devices,
        cuda_device_count=len(devices),
        torch_compile=torch is not None and _can_generate_code(cuda),
    )
    return found if allow_cuda else found.without_cuda()


def _cuda_devices(
    torch: ModuleType | None, providers: tuple[str, ...]
) -> tuple[bool, tuple[str, ...]]:
    """Ask torch built with CUDA (it can list devices); without one, ONNX Runtime's providers."""
    if torch is None:
        return any(name in GPU_PROVIDERS for name in providers), ()
    if not torch.cuda.is_available():
        return False, ()
    return True, tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def _optional(name: str) -> ModuleType | None:
    """The library if it is installed and loads (a broken install counts as absent)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:
        log.warning("%s is installed but does not load: %s", name, exc)
        return None


def _version(module: ModuleType | None) -> str | None:
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def _can_generate_code(cuda: bool) -> bool:
    """Inductor, torch.compile's default backend, compiles C++ on the CPU, triton on CUDA."""
    has_cxx = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    return has_cxx or (cuda and importlib.util.find_spec("triton") is not None)


# --- the ladder ---------------------------------------------------------------------------

Need = Callable[[Capabilities], str | None]
"""Says what a rung lacks on this machine, or None when it can run."""


def _needs_tensorrt(caps: Capabilities) -> str | None:
    if caps.tensorrt is None:
        return "tensorrt is not installed"
    if not caps.torch_on_cuda:
        return "no CUDA device that torch (which holds TensorRT's buffers) can use"
    return None


def _needs_ort_gpu(caps: Capabilities) -> str | None:
    if caps.onnxruntime is None:
        return "onnxruntime is not installed"
    if not caps.ort_gpu_providers:
        return "this onnxruntime build has no TensorRT or CUDA execution provider"
    return None if caps.cuda_available else "no CUDA device"


def _needs_torch_cuda(caps: Capabilities) -> str | None:
    if caps.torch is None:
        return "torch is not installed"
    return None if caps.torch_on_cuda else "torch has no CUDA device"


def _needs_torch(caps: Capabilities) -> str | None:
    return None if caps.torch is not None else "torch is not installed"


def _needs_ort(caps: Capabilities) -> str | None:
    return None if caps.onnxruntime is not None else "onnxruntime is not installed"


@dataclass(frozen=True, slots=True)
class Rung:
    name: str
    backend: str
    device: str | None
    """Where the rung puts the model (None: the backend chooses)."""
    strength: str
    """Why this rung is chosen when it can run, for the log and the API."""
    needs: Need


LADDER: Final[tuple[Rung, ...]] = (
    Rung("tensorrt", "tensorrt", "cuda", "TensorRT engine on the GPU", _needs_tensorrt),
    Rung(
        "onnxruntime-cuda",
        "onnxruntime",
        "cuda",
        "ONNX Runtime with GPU execution providers",
        _needs_ort_gpu,
    ),
    Rung("torch-cuda", "pytorch", "cuda", "PyTorch on the GPU", _needs_torch_cuda),
    Rung("torch-cpu", "pytorch", "cpu", "PyTorch on the CPU", _needs_torch),
    Rung("onnxruntime-cpu", "onnxruntime", "cpu", "ONNX Runtime on the CPU", _needs_ort),
    Rung(
        "causal-lm-cuda",
        "causal_lm",
        "cuda",
        "causal LM with continuous batching on the GPU",
        _needs_torch_cuda,
    ),
    Rung(
        "causal-lm-cpu",
        "causal_lm",
        "cpu",
        "causal LM with continuous batching on the CPU",
        _needs_torch,
    ),
)


def _runs_anywhere(caps: Capabilities) -> str | None:
    return None


def _unranked(backend: str) -> Rung:
    """A registered backend the ladder does not know (a plugin, a test double): it is tried
    after every known rung, on the device it chooses."""
    return Rung(backend, backend, None, "a registered backend outside the ladder", _runs_anywhere)


def _missing_file(rung: Rung, artifacts: Mapping[str, Path | None]) -> str:
    if rung.backend not in artifacts:
        return f"the {rung.backend} backend is not installed"
    return f"no {rung.backend} model file"


def forceable() -> list[str]:
    """What a config's ``backend`` or the force setting may name: a backend or a rung."""
    return sorted({rung.backend for rung in LADDER} | {rung.name for rung in LADDER})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to serve a version: which rung, the file it loads, and why it is here."""

    rung: str
    backend: str
    device: str | None
    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class BackendPlan:
    """Candidates best first, and the rungs passed over with the reason for each."""

    candidates: tuple[Candidate, ...]
    passed_over: tuple[str, ...]

    def describe(self) -> str:
        chosen = "; ".join(f"{c.rung} ({c.reason})" for c in self.candidates) or "none"
        skipped = "; ".join(self.passed_over) or "none"
        return f"candidates: {chosen}; passed over: {skipped}"


def rank_backends(
    caps: Capabilities,
    artifacts: Mapping[str, Path | None],
    *,
    forced: str | None = None,
    forced_by: str = "the model config",
) -> BackendPlan:
    """Walk the ladder for one version folder. ``artifacts`` maps every installed backend to
    the model file it found there (None: none); backends the ladder does not know (plugins,
    test doubles) are tried after its rungs."""
    known = {rung.backend for rung in LADDER}
    rungs = [*LADDER, *(_unranked(backend) for backend in artifacts if backend not in known)]
    if forced is not None and not any(forced in (rung.name, rung.backend) for rung in rungs):
        names = sorted({*forceable(), *artifacts})
        raise ConfigError(f"backend '{forced}' is unknown; known: {', '.join(names)}")
    candidates: list[Candidate] = []
    passed_over: list[str] = []
    for rung in rungs:
        if forced is not None and forced not in (rung.name, rung.backend):
            continue
        path = artifacts.get(rung.backend)
        lacking = _missing_file(rung, artifacts) if path is None else rung.needs(caps)
        if path is None or lacking is not None:
            passed_over.append(f"{rung.name}: {lacking}")
            continue
        reason = f"forced by {forced_by}" if forced is not None else rung.strength
        candidates.append(Candidate(rung.name, rung.backend, rung.device, path, reason))
    return BackendPlan(tuple(candidates), tuple(passed_over))
