"""The benchmark MLP as PyTorch files, with exactly the ONNX file's weights.

``bench/run.py`` builds the benchmark MLP as ONNX (``scripts/build_example_models.py``);
this module reads that file's graph and initializers (``onnx.numpy_helper``), builds the
equivalent ``torch.nn.Module`` (Gemm with ``transB=1`` -> ``Linear``, Relu -> ``ReLU``),
writes it as a ``torch.export`` program (``model.pt2``, dynamic batch dimension) and as
TorchScript (``model.pt``), and checks what both files compute against onnxruntime.

The module returns ``{"output": tensor}``, so the exported program names its output
``output`` as the ONNX file does; its input is the ``forward`` argument ``input``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

TOLERANCE = 1e-4  # largest absolute difference from onnxruntime that passes
CHECK_BATCHES = (1, 3, 64)


class OnnxMLP(torch.nn.Module):
    """A Gemm/Relu chain taken from an ONNX graph; ``forward`` returns ``{output: y}``."""

    def __init__(self, layers: list[torch.nn.Module], output_name: str) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)
        self.output_name = output_name

    def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.output_name: self.layers(input)}


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _linear(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> torch.nn.Linear:
    """``Gemm(x, W, b, transB=1)`` with alpha = beta = 1 as ``Linear`` holding W and b."""
    attrs = _attributes(node)
    if attrs.get("transA", 0) or attrs.get("transB", 0) != 1:
        raise ValueError(f"Gemm {node.name!r}: only transA=0, transB=1 is supported ({attrs})")
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ValueError(f"Gemm {node.name!r}: only alpha = beta = 1 is supported ({attrs})")
    if len(node.input) != 3 or node.input[1] not in weights or node.input[2] not in weights:
        raise ValueError(f"Gemm {node.name!r}: weight and bias must be initializers")
    weight, bias = weights[node.input[1]], weights[node.input[2]]
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32, copy=True)))
        layer.bias.copy_(torch.from_numpy(bias.astype(np.float32, copy=True)))
    return layer


def module_from_onnx(onnx_path: Path) -> OnnxMLP:
    """The ONNX file's Gemm/Relu chain as a module in eval mode, with the same weights."""
    model = onnx.load(str(onnx_path))
    graph = model.graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError(f"{onnx_path}: expected one input and one output")
    current = graph.input[0].name
    layers: list[torch.nn.Module] = []
    for node in graph.node:
        if node.input[0] != current:
            raise ValueError(f"{onnx_path}: node {node.name!r} does not follow {current!r}")
        if node.op_type == "Gemm":
            layers.append(_linear(node, weights))
        elif node.op_type == "Relu":
            layers.append(torch.nn.ReLU())
        else:
            raise ValueError(f"{onnx_path}: unsupported op {node.op_type} ({node.name!r})")
        current = node.output[0]
    if current != graph.output[0].name:
        raise ValueError(f"{onnx_path}: the chain ends in {current!r}, not the graph output")
    return OnnxMLP(layers, current).eval()


def write_exported(module: torch.nn.Module, path: Path, input_dim: int) -> Path:
    """``torch.export`` with a dynamic batch dimension (1 to 4096), saved to ``path``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros((4, input_dim), dtype=torch.float32)
    program = torch.export.export(module, (example,), dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, path)
    return path


def write_torchscript(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        # torch 2.10+ deprecates TorchScript; Sluice still serves existing files.
        warnings.filterwarnings(
            "ignore", r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def load_exported(path: Path) -> Callable[..., Any]:
    """What Sluice runs for ``model.pt2`` on the CPU: the loaded program's module."""
    return torch.export.load(path).module()


def load_torchscript(path: Path) -> Callable[..., Any]:
    """What Sluice runs for ``model.pt`` on the CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        script = torch.jit.load(str(path), map_location="cpu")
    script.eval()
    return script  # type: ignore[no-any-return]


def runner(module: Callable[..., Any], output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy in, numpy out, under ``torch.inference_mode`` (as Sluice's executor runs it)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x))[output_name].numpy()

    return run


def compare(
    runs: dict[str, Callable[[np.ndarray], np.ndarray]],
    reference: Callable[[np.ndarray], np.ndarray],
    input_dim: int,
) -> dict[str, Any]:
    """Each run's largest absolute difference from ``reference`` over a few batches."""
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((b, input_dim), dtype=np.float32) for b in CHECK_BATCHES]
    wants = [reference(x) for x in inputs]
    out: dict[str, Any] = {"batches": list(CHECK_BATCHES), "tolerance": TOLERANCE}
    for name, run in runs.items():
        err = max(
            float(np.max(np.abs(run(x) - want))) for x, want in zip(inputs, wants, strict=True)
        )
        out[name] = {"max_abs_err": err, "ok": err <= TOLERANCE}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def build(onnx_path: Path, pt2_path: Path, pt_path: Path, input_dim: int) -> dict[str, Any]:
    """Write both files from the ONNX file and check them (and the module) against it."""
    import onnxruntime as ort

    module = module_from_onnx(onnx_path)
    write_exported(module, pt2_path, input_dim)
    write_torchscript(module, pt_path)
    output_name = module.output_name
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def reference(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([output_name], {session.get_inputs()[0].name: x})[0])

    check = compare(
        {
            "module": runner(module, output_name),
            "torch.export": runner(load_exported(pt2_path), output_name),
            "torchscript": runner(load_torchscript(pt_path), output_name),
        },
        reference,
        input_dim,
    )
    check["layers"] = len(module.layers)
    return check
