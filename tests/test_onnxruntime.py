"""The ONNX Runtime executor on the real example files, and its provider choice."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from sluice.app import EXAMPLE_REPOSITORY
from sluice.errors import ConfigError
from sluice.executors.base import LoadOptions
from sluice.executors.onnxruntime import OnnxRuntimeFactory, choose_providers
from sluice.settings import ExecutorSettings


def test_provider_ladder_prefers_gpu_and_falls_back_to_cpu() -> None:
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, gpu_build) == gpu_build
    assert choose_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
    ) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="none of the ONNX Runtime providers"):
        choose_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])


async def test_executor_matches_onnxruntime() -> None:
    factory = OnnxRuntimeFactory()
    options = LoadOptions(instance_count=2, settings=ExecutorSettings())
    path = EXAMPLE_REPOSITORY / "mlp" / "2" / "model.onnx"
    executor = factory.load(path, options)
    try:
        x = np.random.default_rng(1).standard_normal((5, 64), dtype=np.float32)
        got = await executor.run({"input": x})
        want = ort.InferenceSession(str(path)).run(None, {"input": x})
        np.testing.assert_allclose(got["logits"], want[0], rtol=1e-6)
        assert [t.name for t in executor.outputs] == ["logits", "probabilities"]
        assert executor.inputs[0].shape == (-1, 64)
    finally:
        await executor.close()
