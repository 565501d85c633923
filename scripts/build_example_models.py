#!/usr/bin/env python3
"""Build Sluice's example ONNX models deterministically.

Writes a model repository laid out as ``<repo>/<model>/<version>/model.onnx`` (plus an
optional ``<repo>/<model>/config.yaml``):

* ``simple``: Triton's classic add/sub example (INT32 ``INPUT0``/``INPUT1`` [batch, 16] ->
  ``OUTPUT0`` = sum, ``OUTPUT1`` = difference). Version 1, no config.yaml.
* ``mlp``: FP32 classifier ``input`` [batch, 64] -> Gemm 128 -> Relu -> Gemm 10 ->
  ``logits`` [batch, 10] and ``probabilities`` (Softmax). Versions 1 and 2 (different
  seeds), with a config.yaml enabling dynamic batching.
* ``passthrough``: one Identity per Open Inference Protocol datatype (``BOOL`` ...
  ``BYTES``), inputs [batch, -1], outputs ``<NAME>_OUT``. All but ``BF16``: ONNX Runtime's
  Python API returns a bfloat16 output only from calls fed through OrtValues, which cannot
  hold strings, so one model cannot take BYTES and return BF16.

Everything is fixed (seeds, opset 17, IR version 8, producer fields, no timestamps), so
running the script twice produces byte-identical files.

``--bench-mlp PATH`` additionally writes the heavier benchmark MLP (256 -> 4 x 1024 ReLU
-> 16, FP32, dynamic batch, about 14 MB); it is built on demand and not committed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR version 8 is the one that goes with opset 17; every onnxruntime >= 1.12 loads it.
IR_VERSION = 8
PRODUCER_NAME = "sluice-build-example-models"
PRODUCER_VERSION = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "server" / "sluice" / "example_models"

MLP_CONFIG_YAML = """\
max_batch_size: 32
dynamic_batching:
  max_queue_delay_us: 500
  preferred_batch_sizes: [8, 16, 32]
"""

# Open Inference Protocol datatype -> ONNX element type, in protocol order.
PASSTHROUGH_TYPES: tuple[tuple[str, int], ...] = (
    ("BOOL", TensorProto.BOOL),
    ("INT8", TensorProto.INT8),
    ("INT16", TensorProto.INT16),
    ("INT32", TensorProto.INT32),
    ("INT64", TensorProto.INT64),
    ("UINT8", TensorProto.UINT8),
    ("UINT16", TensorProto.UINT16),
    ("UINT32", TensorProto.UINT32),
    ("UINT64", TensorProto.UINT64),
    ("FP16", TensorProto.FLOAT16),
    ("FP32", TensorProto.FLOAT),
    ("FP64", TensorProto.DOUBLE),
    ("BYTES", TensorProto.STRING),
)

MLP_SEEDS = {1: 1, 2: 2}


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """Wrap a graph in a model with fixed metadata, and check it."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _write(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` to ``path`` atomically, only if its bytes changed; return size."""
    data = model.SerializeToString(deterministic=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data:
        return len(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def _write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    tmp.replace(path)


def build_simple() -> onnx.ModelProto:
    """INT32 add/sub, like Triton's ``simple`` example."""
    shape: list[str | int] = ["batch", 16]
    inputs = [
        helper.make_tensor_value_info("INPUT0", TensorProto.INT32, shape),
        helper.make_tensor_value_info("INPUT1", TensorProto.INT32, shape),
    ]
    outputs = [
        helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, shape),
        helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, shape),
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
    ]
    graph = helper.make_graph(nodes, "simple", inputs, outputs)
    return _finish(graph, "OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32).")


def _dense(
    rng: np.random.Generator, name: str, fan_in: int, fan_out: int
) -> list[onnx.TensorProto]:
    """He-initialised weight [fan_out, fan_in] (used with transB=1) and small bias."""
    w = rng.standard_normal((fan_out, fan_in), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    b = rng.standard_normal((fan_out,), dtype=np.float32) * np.float32(0.01)
    return [
        numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
        numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"),
    ]


def _mlp_graph(
    name: str,
    *,
    input_name: str,
    output_name: str,
    sizes: Sequence[int],
    seed: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Gemm/Relu stack over ``sizes`` (in, hidden..., out); returns nodes, inits, last."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = input_name
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        layer = f"fc{i}"
        inits.extend(_dense(rng, layer, sizes[i], sizes[i + 1]))
        last = i == n_layers - 1
        gemm_out = output_name if last else f"{layer}.out"
        nodes.append(
            helper.make_node(
                "Gemm",
                [current, f"{layer}.weight", f"{layer}.bias"],
                [gemm_out],
                name=f"{name}.{layer}",
                transB=1,
            )
        )
        current = gemm_out
        if not last:
            relu_out = f"{layer}.relu"
            nodes.append(
                helper.make_node("Relu", [current], [relu_out], name=f"{name}.{layer}.relu")
            )
            current = relu_out
    return nodes, inits, current


def build_mlp(seed: int) -> onnx.ModelProto:
    """FP32 classifier: [batch, 64] -> 128 -> ReLU -> 10 logits + softmax probabilities."""
    nodes, inits, logits = _mlp_graph(
        "mlp", input_name="input", output_name="logits", sizes=(64, 128, 10), seed=seed
    )
    nodes.append(
        helper.make_node("Softmax", [logits], ["probabilities"], name="mlp.softmax", axis=1)
    )
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        initializer=inits,
    )
    return _finish(graph, f"FP32 MLP classifier 64 -> 128 (ReLU) -> 10, seed {seed}.")


def build_passthrough() -> onnx.ModelProto:
    """One Identity per Open Inference Protocol datatype, shape [batch, -1]."""
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    for name, elem in PASSTHROUGH_TYPES:
        shape: list[str | int] = ["batch", f"{name}_len"]
        inputs.append(helper.make_tensor_value_info(name, elem, shape))
        outputs.append(helper.make_tensor_value_info(f"{name}_OUT", elem, shape))
        nodes.append(helper.make_node("Identity", [name], [f"{name}_OUT"], name=f"id_{name}"))
    graph = helper.make_graph(nodes, "passthrough", inputs, outputs)
    return _finish(graph, "Identity for every Open Inference Protocol datatype.")


def build_mlp_bench(
    path: str | Path,
    *,
    width: int = 1024,
    depth: int = 4,
    inputs: int = 256,
    outputs: int = 16,
    seed: int = 0,
) -> Path:
    """Write the benchmark MLP (``inputs`` -> ``depth`` x ``width`` ReLU -> ``outputs``).

    FP32, dynamic batch; input ``input`` [batch, inputs], output ``output``
    [batch, outputs]. Deterministic for given arguments. Returns the path written.
    """
    if min(width, depth, inputs, outputs) < 1:
        raise ValueError("width, depth, inputs and outputs must be >= 1")
    sizes = [inputs, *([width] * depth), outputs]
    nodes, inits, _ = _mlp_graph(
        "bench", input_name="input", output_name="output", sizes=sizes, seed=seed
    )
    graph = helper.make_graph(
        nodes,
        "mlp_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        initializer=inits,
    )
    model = _finish(
        graph,
        f"Benchmark FP32 MLP {inputs} -> {depth} x {width} (ReLU) -> {outputs}, seed {seed}.",
    )
    out = Path(path)
    _write(model, out)
    return out


def build_repository(out: Path) -> list[tuple[Path, int]]:
    """Build every example model under ``out``; return (path, size) for each file."""
    written: list[tuple[Path, int]] = []

    def put(model: onnx.ModelProto, rel: str) -> None:
        p = out / rel
        written.append((p, _write(model, p)))

    put(build_simple(), "simple/1/model.onnx")
    for version, seed in MLP_SEEDS.items():
        put(build_mlp(seed), f"mlp/{version}/model.onnx")
    cfg = out / "mlp" / "config.yaml"
    _write_text(MLP_CONFIG_YAML, cfg)
    written.append((cfg, len(MLP_CONFIG_YAML.encode())))
    put(build_passthrough(), "passthrough/1/model.onnx")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"model repository directory (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--bench-mlp",
        type=Path,
        metavar="PATH",
        help="also write the benchmark MLP (256 -> 4 x 1024 -> 16) to PATH",
    )
    parser.add_argument(
        "--bench-only",
        action="store_true",
        help="with --bench-mlp: write only the benchmark model, not the repository",
    )
    args = parser.parse_args(argv)
    if args.bench_only and args.bench_mlp is None:
        parser.error("--bench-only needs --bench-mlp PATH")

    if not args.bench_only:
        for p, size in build_repository(args.out):
            print(f"{p} ({size} bytes)")
    if args.bench_mlp is not None:
        p = build_mlp_bench(args.bench_mlp)
        print(f"{p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
