"""The capability ladder inside the service: real files, injected machines."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from sluice.dataplane import DataPlane
from sluice.domain import Call, InferRequest, InputTensor
from sluice.executors.capabilities import Capabilities
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.settings import Settings
from tests import models

FAKE_GPU = Capabilities(
    torch="2.13.0",
    torch_cuda="12.8",
    onnxruntime="1.31.1",
    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    cuda_available=True,
    cuda_devices=("H100",),
    cuda_device_count=1,
)
CPU = Capabilities(torch="2.13.0", onnxruntime="1.31.1", ort_providers=("CPUExecutionProvider",))


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("a")
    m = models.make_mlp()
    models.write_onnx(m, d / "model.onnx")
    models.write_torchscript(m, d / "model.pt")
    models.write_exported(m, d / "model.pt2")
    return d


async def _service(repo: Path, caps: Capabilities, **overrides: object) -> ModelRegistry:
    settings = Settings.model_validate({"grpc_port": 0, "metrics_port": None, **overrides})
    service = ModelRegistry(settings, repository=repo, metrics=Metrics(), capabilities=caps)
    await service.load_all()
    return service


async def _infer(service: ModelRegistry, name: str) -> dict[str, np.ndarray]:
    x = models.sample(3)
    plane = DataPlane(service, Settings(), metrics=Metrics(), clock=time.monotonic)
    result = await plane.infer(
        InferRequest(model=name, inputs=[InputTensor("input", "FP32", (3, 64), raw=x.tobytes())]),
        Call(),
    )
    return {o.name: o.array for o in result.outputs}


async def test_fake_gpu_falls_down_the_ladder_to_what_loads(arts: Path, tmp_path: Path) -> None:
    models.write_model_folder(
        tmp_path, "m", {"model.pt2": arts / "model.pt2", "model.onnx": arts / "model.onnx"}
    )
    service = await _service(tmp_path, FAKE_GPU)
    assert service.get("m").spec.backend == "pytorch"  # onnxruntime-cuda and torch-cuda fail here
    assert (await _infer(service, "m"))["logits"].shape == (3, 10)
    await service.close()


async def test_cpu_prefers_torch_and_force_setting_wins(arts: Path, tmp_path: Path) -> None:
    models.write_model_folder(
        tmp_path, "m", {"model.pt2": arts / "model.pt2", "model.onnx": arts / "model.onnx"}
    )
    service = await _service(tmp_path, CPU)
    assert service.get("m").spec.backend == "pytorch"
    await service.close()
    service = await _service(tmp_path, CPU, force_backend="onnxruntime-cpu")
    assert service.get("m").spec.backend == "onnxruntime"
    await service.close()


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")
async def test_torchscript_with_config(arts: Path, tmp_path: Path) -> None:
    models.write_model_folder(
        tmp_path,
        "ts",
        {"model.pt": arts / "model.pt"},
        config=models.TORCHSCRIPT_CONFIG + "backend: pytorch\ntorch_compile: false\n",
    )
    service = await _service(tmp_path, CPU)
    assert service.get("ts").spec.backend == "pytorch"
    got = await _infer(service, "ts")
    assert got["probabilities"].shape == (3, 10)
    await service.close()
