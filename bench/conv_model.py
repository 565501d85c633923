"""The benchmark's second model: a small convolution with two inputs.

``conv`` takes FP32 ``image`` [batch, 3, 32, 32] and FP32 ``features`` [batch, 8]:

    image -> Conv 3->16 (3x3, stride 2) -> ReLU -> Conv 16->32 (3x3, stride 2) -> ReLU
          -> GlobalAveragePool -> Flatten [batch, 32]
    concat(that, features) [batch, 40] -> Gemm 40->10 -> ``scores`` [batch, 10]

It differs from the MLP in every way a server notices: two inputs, a 4-D input of 12 KB
per row (the MLP's is 1 KB), a small output, and compute that is convolution, not matrix
products. Deterministic for a given seed, opset 17, dynamic batch dimension; built on the
fly by ``bench/run.py`` (it is not committed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "conv"
INPUTS = (("image", (3, 32, 32)), ("features", (8,)))
OUTPUTS = (("scores", (10,)),)
OPSET = 17


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        scale = np.float32(np.sqrt(2.0 / fan_in))
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (rng.standard_normal((n,), dtype=np.float32) * np.float32(0.01)).astype(np.float32)

    return {
        "conv1.weight": he((16, 3, 3, 3), 3 * 9),
        "conv1.bias": bias(16),
        "conv2.weight": he((32, 16, 3, 3), 16 * 9),
        "conv2.bias": bias(32),
        "head.weight": he((10, 40), 40),
        "head.bias": bias(10),
    }


def build(path: str | Path, *, seed: int = 0) -> Path:
    """Write the model to ``path`` and return it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = _weights(seed)
    inits = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Concat", ["flat", "features"], ["joined"], axis=1),
        helper.make_node("Gemm", ["joined", "head.weight", "head.bias"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bench",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])
            for name, dims in INPUTS
        ],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])
            for name, dims in OUTPUTS
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.doc_string = f"Benchmark two-input convolution model, seed {seed}."
    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString(deterministic=True))
    return out


def reference(image: np.ndarray, features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The same computation in numpy (float64), for checking the ONNX file."""
    w = {k: v.astype(np.float64) for k, v in _weights(seed).items()}

    def conv(x: np.ndarray, weight: np.ndarray, b: np.ndarray) -> np.ndarray:
        n, _, h, wd = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        oh, ow = (h + 1) // 2, (wd + 1) // 2
        out = np.empty((n, weight.shape[0], oh, ow))
        for i in range(oh):
            for j in range(ow):
                patch = padded[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
                out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, weight) + b
        return out

    x = np.maximum(conv(image.astype(np.float64), w["conv1.weight"], w["conv1.bias"]), 0)
    x = np.maximum(conv(x, w["conv2.weight"], w["conv2.bias"]), 0)
    joined = np.concatenate([x.mean(axis=(2, 3)), features.astype(np.float64)], axis=1)
    return joined @ w["head.weight"].T + w["head.bias"]
