"""Capability detection, and the ladder's choice on machines with and without CUDA.

The machines are injected: a ``Capabilities`` built by hand stands for an H100 box with
every library, a CPU-only box, an ONNX-Runtime-only GPU box, and so on.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from sluice.errors import ConfigError
from sluice.executors.capabilities import Capabilities, detect, forceable, rank_backends
from sluice.executors.onnxruntime import OnnxRuntimeFactory
from sluice.executors.pytorch import PyTorchFactory
from sluice.executors.registry import BackendRegistry
from sluice.executors.tensorrt import TensorRTFactory

GPU_BOX = Capabilities(
    python="3.11.7",
    torch="2.13.0",
    torch_cuda="12.8",
    onnxruntime="1.31.1",
    ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    tensorrt="10.9.0",
    cuda_available=True,
    cuda_devices=("NVIDIA H100 80GB HBM3",),
    cuda_device_count=1,
    torch_compile=True,
)
CPU_BOX = Capabilities(
    python="3.11.7",
    torch="2.13.0+cpu",
    onnxruntime="1.31.1",
    ort_providers=("CPUExecutionProvider",),
    torch_compile=True,
)
# onnxruntime-gpu and nothing else: only its providers tell of CUDA.
ORT_GPU_BOX = Capabilities(
    python="3.11.7",
    onnxruntime="1.31.1",
    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    cuda_available=True,
)
# A GPU box whose torch has CUDA but where tensorrt is not installed.
NO_TENSORRT_BOX = Capabilities(
    python="3.11.7",
    torch="2.13.0",
    torch_cuda="12.8",
    onnxruntime="1.31.1",
    ort_providers=("CPUExecutionProvider",),
    cuda_available=True,
    cuda_devices=("NVIDIA L4",),
    cuda_device_count=1,
)

ALL = {
    "tensorrt": "model.plan",
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt2",
    "causal_lm": "config.json",
}


def _artifacts(*backends: str) -> dict[str, Path | None]:
    """Every backend installed; the given ones found their file."""
    return {
        backend: Path("1") / name if backend in backends else None for backend, name in ALL.items()
    }


def _rungs(caps: Capabilities, *backends: str, forced: str | None = None) -> list[str]:
    plan = rank_backends(caps, _artifacts(*backends), forced=forced)
    return [candidate.rung for candidate in plan.candidates]


@pytest.mark.parametrize(
    ("caps", "backends", "expected"),
    [
        pytest.param(
            GPU_BOX,
            ("tensorrt", "onnxruntime", "pytorch"),
            ["tensorrt", "onnxruntime-cuda", "torch-cuda", "torch-cpu", "onnxruntime-cpu"],
            id="gpu-every-file",
        ),
        pytest.param(
            CPU_BOX,
            ("tensorrt", "onnxruntime", "pytorch"),
            ["torch-cpu", "onnxruntime-cpu"],
            id="cpu-every-file",
        ),
        pytest.param(
            GPU_BOX,
            ("onnxruntime", "pytorch"),
            ["onnxruntime-cuda", "torch-cuda", "torch-cpu", "onnxruntime-cpu"],
            id="gpu-no-plan",
        ),
        pytest.param(GPU_BOX, ("pytorch",), ["torch-cuda", "torch-cpu"], id="gpu-torch-only"),
        pytest.param(
            GPU_BOX.without_cuda(),
            ("tensorrt", "onnxruntime", "pytorch"),
            ["torch-cpu", "onnxruntime-cpu"],
            id="gpu-with-cuda-turned-off",
        ),
        pytest.param(
            ORT_GPU_BOX,
            ("onnxruntime", "pytorch"),
            ["onnxruntime-cuda", "onnxruntime-cpu"],
            id="onnxruntime-gpu-without-torch",
        ),
        pytest.param(
            NO_TENSORRT_BOX,
            ("tensorrt", "onnxruntime"),
            ["onnxruntime-cpu"],
            id="plan-without-tensorrt",
        ),
        pytest.param(CPU_BOX, ("tensorrt",), [], id="cpu-plan-only"),
        pytest.param(GPU_BOX, ("causal_lm",), ["causal-lm-cuda", "causal-lm-cpu"], id="lm-gpu"),
        pytest.param(CPU_BOX, ("causal_lm",), ["causal-lm-cpu"], id="lm-cpu"),
    ],
)
def test_ladder_picks_the_best_backend_the_machine_can_run(
    caps: Capabilities, backends: tuple[str, ...], expected: list[str]
) -> None:
    assert _rungs(caps, *backends) == expected


def test_every_choice_and_every_pass_has_a_reason() -> None:
    plan = rank_backends(CPU_BOX, _artifacts("tensorrt", "onnxruntime"))
    assert [(c.rung, c.device, c.reason) for c in plan.candidates] == [
        ("onnxruntime-cpu", "cpu", "ONNX Runtime on the CPU")
    ]
    assert plan.candidates[0].path == Path("1/model.onnx")
    assert plan.passed_over == (
        "tensorrt: tensorrt is not installed",
        "onnxruntime-cuda: this onnxruntime build has no TensorRT or CUDA execution provider",
        "torch-cuda: no pytorch model file",
        "torch-cpu: no pytorch model file",
        "causal-lm-cuda: no causal_lm model file",
        "causal-lm-cpu: no causal_lm model file",
    )
    assert "onnxruntime-cpu (ONNX Runtime on the CPU)" in plan.describe()


@pytest.mark.parametrize(
    ("caps", "forced", "expected"),
    [
        (GPU_BOX, "pytorch", ["torch-cuda", "torch-cpu"]),
        (GPU_BOX, "torch-cpu", ["torch-cpu"]),
        (GPU_BOX, "onnxruntime", ["onnxruntime-cuda", "onnxruntime-cpu"]),
        (GPU_BOX, "onnxruntime-cpu", ["onnxruntime-cpu"]),
        (CPU_BOX, "tensorrt", []),
    ],
)
def test_a_forced_backend_keeps_only_its_own_rungs(
    caps: Capabilities, forced: str, expected: list[str]
) -> None:
    plan = rank_backends(caps, _artifacts(*ALL), forced=forced, forced_by="SLUICE_FORCE_BACKEND")
    assert [c.rung for c in plan.candidates] == expected
    assert all(c.reason == "forced by SLUICE_FORCE_BACKEND" for c in plan.candidates)


def test_an_unknown_forced_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'tensorflow' is unknown"):
        rank_backends(GPU_BOX, _artifacts(*ALL), forced="tensorflow")
    assert "torch-cuda" in forceable()
    assert "pytorch" in forceable()


def _registry() -> BackendRegistry:
    return BackendRegistry([OnnxRuntimeFactory(), PyTorchFactory(), TensorRTFactory()])


def test_registry_plans_from_the_files_in_a_version_folder(tmp_path: Path) -> None:
    for name in ("model.plan", "model.onnx", "model.pt", "model.pt2"):
        (tmp_path / name).touch()
    plan = _registry().plan(tmp_path, GPU_BOX)
    assert [(c.rung, c.path.name) for c in plan.candidates] == [
        ("tensorrt", "model.plan"),
        ("onnxruntime-cuda", "model.onnx"),
        ("torch-cuda", "model.pt2"),  # an exported program before TorchScript
        ("torch-cpu", "model.pt2"),
        ("onnxruntime-cpu", "model.onnx"),
    ]
    assert _registry().factory(plan.candidates[0].backend).backend == "tensorrt"


def test_registry_says_why_nothing_can_serve_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.plan").touch()
    with pytest.raises(ConfigError, match=r"no backend can serve .*tensorrt: no CUDA device"):
        _registry().plan(tmp_path, dataclasses.replace(CPU_BOX, tensorrt="10.9.0"))


def test_detect_reports_this_machine() -> None:
    caps = detect()
    assert caps.python == platform.python_version()
    assert caps.torch == torch.__version__
    assert caps.onnxruntime == ort.__version__
    assert caps.ort_providers == tuple(ort.get_available_providers())
    assert caps.cuda_available == torch.cuda.is_available()
    assert caps.cuda_device_count == len(caps.cuda_devices) == torch.cuda.device_count()
    assert json.loads(json.dumps(caps.to_dict()))["torch"] == torch.__version__


def test_cuda_can_be_turned_off() -> None:
    caps = detect(allow_cuda=False)
    assert not caps.cuda_available
    assert caps.cuda_devices == ()
    assert _rungs(caps, "pytorch", "onnxruntime") == ["torch-cpu", "onnxruntime-cpu"]


def test_backends_the_ladder_does_not_know_come_last() -> None:
    artifacts = {**_artifacts("onnxruntime"), "fake": Path("1/model.fake")}
    plan = rank_backends(CPU_BOX, artifacts)
    assert [(c.rung, c.device) for c in plan.candidates] == [
        ("onnxruntime-cpu", "cpu"),
        ("fake", None),
    ]
    forced = rank_backends(CPU_BOX, artifacts, forced="fake")
    assert [c.rung for c in forced.candidates] == ["fake"]


def test_a_backend_that_is_not_installed_says_so() -> None:
    plan = rank_backends(CPU_BOX, {"onnxruntime": Path("1/model.onnx")})
    assert "torch-cpu: the pytorch backend is not installed" in plan.passed_over
