"""Test model files: one small MLP with fixed weights, written in every format Sluice serves.

The same weights go to ONNX (built with ``onnx.helper``: the graph the example models use,
no exporter dependency), TorchScript, ``torch.export`` (dynamic batch) and, on a GPU, a
TensorRT engine built from the ONNX file. ``reference`` computes the outputs in numpy, so
every backend is checked against one oracle rather than against each other.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from sluice.executors.base import DeclaredTensor

INPUT_DIM = 64
HIDDEN_DIM = 128
CLASSES = 10

INPUTS = (DeclaredTensor("input", "FP32", (-1, INPUT_DIM)),)
OUTPUTS = (
    DeclaredTensor("logits", "FP32", (-1, CLASSES)),
    DeclaredTensor("probabilities", "FP32", (-1, CLASSES)),
)

# What a TorchScript model's config.yaml must say, since the file itself names no tensors.
TORCHSCRIPT_CONFIG = f"""\
max_batch_size: 32
inputs:
  - {{name: input, datatype: FP32, dims: [{INPUT_DIM}]}}
outputs:
  - {{name: logits, datatype: FP32, dims: [{CLASSES}]}}
  - {{name: probabilities, datatype: FP32, dims: [{CLASSES}]}}
"""

Floats = npt.NDArray[np.float32]


class MLP(torch.nn.Module):
    """64 -> 128 (ReLU) -> 10 logits and their softmax, returned by name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = torch.nn.Linear(INPUT_DIM, HIDDEN_DIM)
        self.fc1 = torch.nn.Linear(HIDDEN_DIM, CLASSES)

    def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc1(torch.relu(self.fc0(input)))
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=1)}


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def weights(model: MLP) -> dict[str, Floats]:
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def reference(params: dict[str, Floats], x: Floats) -> dict[str, Floats]:
    """The MLP in numpy, in float64 to be the more exact side of every comparison."""
    hidden = np.maximum(x.astype(np.float64) @ params["fc0.weight"].T + params["fc0.bias"], 0)
    logits = hidden @ params["fc1.weight"].T + params["fc1.bias"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {"logits": logits, "probabilities": exp / exp.sum(axis=1, keepdims=True)}


def sample(rows: int, seed: int = 0) -> Floats:
    return np.random.default_rng(seed).standard_normal((rows, INPUT_DIM), dtype=np.float32)


def write_onnx(model: MLP, path: Path) -> Path:
    params = weights(model)
    initializers = [numpy_helper.from_array(array, name) for name, array in params.items()]
    nodes = [
        helper.make_node("Gemm", ["input", "fc0.weight", "fc0.bias"], ["fc0.out"], transB=1),
        helper.make_node("Relu", ["fc0.out"], ["fc0.relu"]),
        helper.make_node("Gemm", ["fc0.relu", "fc1.weight", "fc1.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", INPUT_DIM])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", CLASSES])
            for name in ("logits", "probabilities")
        ],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def write_torchscript(model: MLP, path: Path) -> Path:
    with warnings.catch_warnings():
        # torch 2.10+ deprecates TorchScript in favour of torch.export; Sluice still serves
        # existing TorchScript files, so the tests must be able to make one.
        warnings.filterwarnings(
            "ignore", r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def write_exported(model: MLP, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        model, (torch.from_numpy(sample(4)),), dynamic_shapes={"input": {0: batch}}
    )
    torch.export.save(program, path)
    return path


def write_tensorrt_plan(
    onnx_path: Path, path: Path, *, min_batch: int, opt_batch: int, max_batch: int
) -> Path:
    """Build an engine with one optimization profile (needs tensorrt and a GPU)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # keep FP32 exact enough to compare with numpy
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    dims = tuple(network.get_input(0).shape)[1:]
    profile.set_shape(name, (min_batch, *dims), (opt_batch, *dims), (max_batch, *dims))
    config.add_optimization_profile(profile)
    serialized: Any = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}")
    path.write_bytes(bytes(serialized))
    return path


def write_model_folder(
    repository: Path, name: str, files: dict[str, Path], *, config: str | None = None
) -> Path:
    """``<repository>/<name>/1/<file>`` for each given file (copied), and its config."""
    version = repository / name / "1"
    version.mkdir(parents=True)
    for filename, source in files.items():
        (version / filename).write_bytes(source.read_bytes())
    if config is not None:
        (repository / name / "config.yaml").write_text(config)
    return repository / name


def write_identity(
    repository: Path, name: str, *, element: int = TensorProto.FLOAT, dims: tuple[int, ...] = (-1,)
) -> Path:
    """``<repository>/<name>/1/model.onnx``: ``y`` = ``x`` of shape [batch, *dims] (-1: any)."""
    shape: list[Any] = ["batch", *(f"d{i}" if d < 0 else d for i, d in enumerate(dims))]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", element, shape)],
        [helper.make_tensor_value_info("y", element, shape)],
    )
    return _save(repository, name, graph)


def write_fanout(repository: Path, name: str, *, width: int) -> Path:
    """``y`` [batch, width] = ``x`` [batch, 1] repeated: a tiny request, a reply as large as
    ``width`` says (known from the model's shapes before it runs)."""
    repeats = numpy_helper.from_array(np.array([1, width], dtype=np.int64), "repeats")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[repeats],
    )
    return _save(repository, name, graph)


def _save(repository: Path, name: str, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = repository / name / "1"
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    return repository / name


def write_echo_repository(repository: Path, *, dims: tuple[int, ...] = (-1,)) -> Path:
    """Identity models for tests that need exact control of request and reply sizes:
    ``echo`` (FP32 ``x`` [batch, *dims] -> ``y``) and ``echo_bytes`` (BYTES, [batch, -1])."""
    write_identity(repository, "echo", dims=dims)
    write_identity(repository, "echo_bytes", element=TensorProto.STRING)
    return repository
