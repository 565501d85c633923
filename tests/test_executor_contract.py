"""One contract, every executor: the same MLP in each format must declare the same tensors,
compute the same numbers, refuse bad tensors the same way, serve concurrent calls and close.

ONNX Runtime, TorchScript, torch.export (plain and through torch.compile) run here; torch on
CUDA and TensorRT carry the ``gpu`` marker and run where a CUDA device is. Below the contract:
TensorRT's shape planning and engine description (plain functions, no GPU), the PyTorch
backend's own rules, and one model served by torch through a real server.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import torch

from sluice.app import EXAMPLE_REPOSITORY
from sluice.errors import ConfigError, ExecutorError, InvalidInputError, ModelNotReadyError
from sluice.executors.base import Executor, ExecutorFactory, LoadOptions
from sluice.executors.onnxruntime import OnnxRuntimeFactory
from sluice.executors.pytorch import PyTorchFactory, choose_device, translate
from sluice.executors.registry import BackendRegistry
from sluice.executors.tensorrt import (
    Chunk,
    ShapeRange,
    TensorRTFactory,
    batch_limits,
    check_shape,
    datatype_for,
    describe_engine,
    join_chunks,
    split_batch,
    take_chunk,
)
from sluice.settings import ExecutorSettings
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests import models
from tests.conftest import StartServer

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")
# torch 2.10+ deprecates TorchScript; loading existing TorchScript files is what we test.
torchscript_deprecated = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning"
)

# TensorRT engines are built with a batch range of 1..16: a batch of 32 is split in two.
PLAN_MAX_BATCH = 16


@dataclass(frozen=True)
class Case:
    make_factory: Callable[[], ExecutorFactory]
    filename: str
    device: str | None = None
    compile: bool = False
    declared: bool = False  # the config names the tensors (TorchScript)
    tolerance: dict[str, float] = field(default_factory=lambda: {"rtol": 1e-5, "atol": 1e-6})


GPU_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def _eager_compiling() -> PyTorchFactory:
    return PyTorchFactory(compile_backend="eager")


CASES = [
    pytest.param(Case(OnnxRuntimeFactory, "model.onnx", device="cpu"), id="onnxruntime"),
    pytest.param(
        Case(PyTorchFactory, "model.pt", device="cpu", declared=True),
        id="torchscript",
        marks=torchscript_deprecated,
    ),
    pytest.param(Case(PyTorchFactory, "model.pt2", device="cpu"), id="torch-export"),
    pytest.param(
        # The eager backend runs dynamo's capture and the warm-up path in a second; inductor's
        # C++ code generation takes ~40 s on a 2-core machine.
        Case(_eager_compiling, "model.pt2", device="cpu", compile=True),
        id="torch-compile",
    ),
    pytest.param(
        Case(_eager_compiling, "model.pt2", device="cuda", compile=True, tolerance=GPU_TOLERANCE),
        id="torch-compile-cuda",
        marks=[pytest.mark.gpu, needs_cuda],
    ),
    pytest.param(
        Case(PyTorchFactory, "model.pt2", device="cuda", tolerance=GPU_TOLERANCE),
        id="torch-export-cuda",
        marks=[pytest.mark.gpu, needs_cuda],
    ),
    pytest.param(
        Case(TensorRTFactory, "model.plan", tolerance=GPU_TOLERANCE),
        id="tensorrt",
        marks=[pytest.mark.gpu, needs_cuda],
    ),
]


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    params: dict[str, models.Floats]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    folder = tmp_path_factory.mktemp("mlp")
    model = models.make_mlp()
    models.write_onnx(model, folder / "model.onnx")
    models.write_torchscript(model, folder / "model.pt")
    models.write_exported(model, folder / "model.pt2")
    return Artifacts(folder, models.weights(model))


def _model_file(case: Case, artifacts: Artifacts) -> Path:
    path = artifacts.folder / case.filename
    if case.filename == "model.plan" and not path.exists():
        pytest.importorskip("tensorrt")
        models.write_tensorrt_plan(
            artifacts.folder / "model.onnx",
            path,
            min_batch=1,
            opt_batch=8,
            max_batch=PLAN_MAX_BATCH,
        )
    return path


def _load(case: Case, artifacts: Artifacts, *, instance_count: int = 2) -> Executor:
    options = LoadOptions(
        instance_count=instance_count,
        settings=ExecutorSettings(),
        declared_inputs=models.INPUTS if case.declared else None,
        declared_outputs=models.OUTPUTS if case.declared else None,
        device=case.device,
        compile=case.compile,
    )
    return case.make_factory().load(_model_file(case, artifacts), options)


@pytest.fixture(scope="module", params=CASES)
def loaded(request: pytest.FixtureRequest, artifacts: Artifacts) -> Iterator[tuple[Case, Executor]]:
    """One executor per backend for the module's read-only checks (closed at the end)."""
    case: Case = request.param
    executor = _load(case, artifacts)
    yield case, executor
    asyncio.run(executor.close())


def _assert_matches(got: dict[str, Any], x: models.Floats, case: Case, params: Any) -> None:
    want = models.reference(params, x)
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected, **case.tolerance, err_msg=name)


# --- the contract -------------------------------------------------------------------------


def test_declares_the_same_tensors(loaded: tuple[Case, Executor]) -> None:
    _, executor = loaded
    assert tuple(executor.inputs) == models.INPUTS
    assert tuple(executor.outputs) == models.OUTPUTS


@pytest.mark.parametrize("rows", [1, 7, 32])
async def test_results_match_the_reference(
    loaded: tuple[Case, Executor], artifacts: Artifacts, rows: int
) -> None:
    case, executor = loaded
    x = models.sample(rows, seed=rows)
    got = await executor.run({"input": x})
    _assert_matches(got, x, case, artifacts.params)


async def test_read_only_inputs_are_accepted(
    loaded: tuple[Case, Executor], artifacts: Artifacts
) -> None:
    """Request tensors are read-only views of the message's bytes."""
    case, executor = loaded
    x = models.sample(3)
    view = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)
    _assert_matches(await executor.run({"input": view}), x, case, artifacts.params)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(np.zeros((3, models.INPUT_DIM - 1), np.float32), id="inner-dimension"),
        pytest.param(np.zeros((3, models.INPUT_DIM), np.float64), id="datatype"),
        pytest.param(np.zeros(models.INPUT_DIM, np.float32), id="rank"),
    ],
)
async def test_bad_tensors_are_invalid_input(
    loaded: tuple[Case, Executor], bad: models.Floats
) -> None:
    _, executor = loaded
    with pytest.raises(InvalidInputError):
        await executor.run({"input": bad})


async def test_concurrent_calls_get_their_own_rows(
    loaded: tuple[Case, Executor], artifacts: Artifacts
) -> None:
    case, executor = loaded
    batches = [models.sample(1 + i % 5, seed=100 + i) for i in range(16)]
    results = await asyncio.gather(*(executor.run({"input": x}) for x in batches))
    for x, got in zip(batches, results, strict=True):
        _assert_matches(got, x, case, artifacts.params)


@pytest.mark.parametrize("case", CASES)
async def test_close_releases_the_model(case: Case, artifacts: Artifacts) -> None:
    before = torch.cuda.memory_allocated() if HAS_CUDA else 0
    executor = _load(case, artifacts, instance_count=1)
    await executor.run({"input": models.sample(2)})
    await executor.close()
    await executor.close()  # closing twice is harmless
    # torch.compile's caches may keep a compiled module's weights until torch.compiler.reset()
    if HAS_CUDA and executor.device.startswith("cuda") and not case.compile:
        del executor
        gc.collect()  # exported modules hold reference cycles
        assert torch.cuda.memory_allocated() <= before


# --- through a real server ----------------------------------------------------------------


async def test_server_serves_an_exported_program(
    start_server: StartServer, artifacts: Artifacts, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    models.write_model_folder(
        repository, "mlp_torch", {"model.pt2": artifacts.folder / "model.pt2"}
    )
    server = await start_server(repository=repository)
    x = models.sample(5, seed=9)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp_torch"))
        response = await stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="mlp_torch",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="input", datatype="FP32", shape=list(x.shape)
                    )
                ],
                raw_input_contents=[x.tobytes()],
            )
        )
    assert "pytorch" in metadata.platform
    got = {
        output.name: np.frombuffer(raw, np.float32).reshape(tuple(output.shape))
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    _assert_matches(got, x, Case(PyTorchFactory, "model.pt2"), artifacts.params)


def test_default_registry_knows_every_backend() -> None:
    assert set(BackendRegistry.default().backends) == {
        "onnxruntime",
        "pytorch",
        "tensorrt",
        "causal_lm",
    }


# --- PyTorch backend rules ----------------------------------------------------------------


async def test_a_closed_torch_executor_refuses_work(artifacts: Artifacts) -> None:
    executor = _load(Case(PyTorchFactory, "model.pt2", device="cpu"), artifacts)
    await executor.close()
    with pytest.raises(ModelNotReadyError, match="closed"):
        await executor.run({"input": models.sample(1)})


@torchscript_deprecated
def test_torchscript_needs_its_tensors_declared(artifacts: Artifacts) -> None:
    options = LoadOptions(instance_count=1, settings=ExecutorSettings(), device="cpu")
    with pytest.raises(ConfigError, match="list 'inputs' and 'outputs'"):
        PyTorchFactory().load(artifacts.folder / "model.pt", options)


def test_unreadable_model_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a program")
    options = LoadOptions(instance_count=1, settings=ExecutorSettings(), device="cpu")
    with pytest.raises(ConfigError, match="torch cannot load"):
        PyTorchFactory().load(path, options)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_a_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        choose_device("cuda")
    assert choose_device(None) == torch.device("cpu")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x63 and 64x128)"),
            InvalidInputError,
        ),
        (RuntimeError("expected scalar type Float but found Double"), InvalidInputError),
        (AssertionError("Guard failed: input.size()[1] == 64"), InvalidInputError),
        (RuntimeError("Expected all tensors to be on the same device"), ExecutorError),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ExecutorError),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), ExecutorError),
    ],
)
def test_torch_errors_are_translated(exc: Exception, kind: type[Exception]) -> None:
    translated = translate(exc)
    assert type(translated) is kind
    assert translated.transient == (kind is ExecutorError)


# --- TensorRT shape planning (plain functions, no GPU) --------------------------------------


def test_tensorrt_datatypes() -> None:
    assert datatype_for("FLOAT", where="x") == "FP32"
    assert datatype_for("HALF", where="x") == "FP16"
    with pytest.raises(ConfigError, match="FP8"):
        datatype_for("FP8", where="x")


def test_batches_beyond_the_profile_are_split_and_small_ones_padded() -> None:
    assert split_batch(32, min_rows=1, max_rows=16) == [Chunk(0, 16, 16), Chunk(16, 32, 16)]
    assert split_batch(7, min_rows=1, max_rows=16) == [Chunk(0, 7, 7)]
    assert split_batch(20, min_rows=8, max_rows=8) == [
        Chunk(0, 8, 8),
        Chunk(8, 16, 8),
        Chunk(16, 20, 8),
    ]
    assert split_batch(1, min_rows=4, max_rows=8) == [Chunk(0, 1, 4)]


def test_chunks_round_trip_without_their_padding() -> None:
    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    chunks = split_batch(20, min_rows=8, max_rows=8)
    parts = [take_chunk({"x": x}, chunk) for chunk in chunks]
    assert [len(part["x"]) for part in parts] == [8, 8, 8]
    assert not parts[-1]["x"][4:].any()  # zero padding
    np.testing.assert_array_equal(join_chunks(parts, chunks)["x"], x)


def test_shapes_outside_the_profile_are_rejected_with_the_range() -> None:
    allowed = ShapeRange(min=(1, 8), opt=(8, 64), max=(16, 128))
    check_shape("input", (500, 64), allowed, batched=True)  # the batch is split, not refused
    with pytest.raises(InvalidInputError, match=r"dimension 1 is 200; .* allows 8\.\.128"):
        check_shape("input", (4, 200), allowed, batched=True)
    with pytest.raises(InvalidInputError, match="3 dimension"):
        check_shape("input", (4, 64, 1), allowed, batched=True)
    with pytest.raises(InvalidInputError, match=r"dimension 0 is 32; .* allows 1\.\.16"):
        check_shape("input", (32, 64), allowed, batched=False)


def test_batch_limits_are_what_every_input_allows() -> None:
    a = ShapeRange(min=(1, 4), opt=(8, 4), max=(32, 4))
    b = ShapeRange(min=(2, 3), opt=(8, 3), max=(16, 3))
    assert batch_limits({"a": a, "b": b}, where="x") == (2, 16)
    with pytest.raises(ConfigError, match="no common batch size"):
        batch_limits({"a": a, "c": ShapeRange.fixed((64, 3))}, where="x")


class FakeEngine:
    """What describe_engine reads from an ICudaEngine, for the MLP plan."""

    tensors: ClassVar[dict[str, tuple[str, str, tuple[int, ...]]]] = {
        "input": ("INPUT", "FLOAT", (-1, 64)),
        "logits": ("OUTPUT", "FLOAT", (-1, 10)),
        "probabilities": ("OUTPUT", "FLOAT", (-1, 10)),
    }
    num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self.tensors[name][1])  # an enum member: .name

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert profile == 0
        return [(1, 64), (8, 64), (16, 64)]


def test_engine_bindings_become_declared_tensors() -> None:
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT"))
    inputs, outputs, ranges = describe_engine(trt, FakeEngine(), Path("model.plan"))
    assert inputs == models.INPUTS
    assert outputs == models.OUTPUTS
    assert ranges == {"input": ShapeRange((1, 64), (8, 64), (16, 64))}


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on a machine without tensorrt")
def test_a_plan_without_tensorrt_installed_is_a_config_error(tmp_path: Path) -> None:
    options = LoadOptions(instance_count=1, settings=ExecutorSettings())
    with pytest.raises(ConfigError, match="tensorrt package is not usable"):
        TensorRTFactory().load(tmp_path / "model.plan", options)


@pytest.mark.gpu
@needs_cuda
async def test_tensorrt_engine_from_the_example_model_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    source = EXAMPLE_REPOSITORY / "mlp" / "2" / "model.onnx"
    plan = models.write_tensorrt_plan(
        source, tmp_path / "model.plan", min_batch=1, opt_batch=8, max_batch=PLAN_MAX_BATCH
    )
    options = LoadOptions(instance_count=1, settings=ExecutorSettings())
    engine = TensorRTFactory().load(plan, options)
    session = OnnxRuntimeFactory().load(source, options)
    try:
        x = models.sample(3 * PLAN_MAX_BATCH + 5, seed=4)  # four chunks
        got, want = await engine.run({"input": x}), await session.run({"input": x})
        for name in want:
            np.testing.assert_allclose(got[name], want[name], **GPU_TOLERANCE)
        assert {t.name: t.shape for t in engine.inputs} == {"input": (-1, 64)}
    finally:
        await engine.close()
        await session.close()
