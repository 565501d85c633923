"""TensorRT backend: serialized engines (``model.plan``) through the ``tensorrt`` Python API.

Each instance deserializes its own engine and execution context (TensorRT has long let a
dynamic-shape optimization profile serve only one context at a time, so instances never
share one) and runs on its own CUDA stream; device buffers are torch CUDA tensors, so no
pycuda.
Optimization profile 0 bounds the shapes: a batch larger than its maximum batch is split into
chunks that fit (and one below its minimum is padded), and any other dimension outside the
profile is rejected with the allowed range. ``tensorrt`` is imported only when an engine is
loaded, so this module imports on machines without it; the shape planning is plain functions.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from sluice.errors import (
    ConfigError,
    ExecutorError,
    InvalidInputError,
    SluiceError,
)
from sluice.executors._threads import ThreadedExecutor
from sluice.executors.base import DeclaredTensor, Executor, ExecutorFactory, LoadOptions
from sluice.executors.pytorch import (
    TORCH_DTYPES,
    check_inputs,
    choose_device,
    to_array,
    to_tensor,
    translate,
)
from sluice.tensors import Array

log = logging.getLogger(__name__)

# TensorRT DataType names -> Open Inference Protocol datatypes.
_DATATYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}

_PROFILE = 0


def datatype_for(trt_name: str, *, where: str) -> str:
    """The Open Inference Protocol datatype of a TensorRT ``DataType`` name."""
    datatype = _DATATYPES.get(trt_name)
    if datatype is None:
        raise ConfigError(f"{where} has TensorRT type {trt_name}, which Sluice cannot serve")
    return datatype


@dataclass(frozen=True, slots=True)
class ShapeRange:
    """What an optimization profile allows for one input: every dimension in min..max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def fixed(cls, shape: tuple[int, ...]) -> ShapeRange:
        return cls(shape, shape, shape)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows ``start:stop`` of a batch, run as ``rows`` rows (the rest is zero padding)."""

    start: int
    stop: int
    rows: int


def check_shape(name: str, shape: tuple[int, ...], allowed: ShapeRange, *, batched: bool) -> None:
    """Reject a shape the profile cannot take; the batch dimension is split, not rejected."""
    if len(shape) != len(allowed.max):
        raise InvalidInputError(
            f"input '{name}' has {len(shape)} dimension(s); the engine takes {len(allowed.max)}"
        )
    for axis, (dim, low, high) in enumerate(zip(shape, allowed.min, allowed.max, strict=True)):
        if batched and axis == 0:
            continue
        if not low <= dim <= high:
            raise InvalidInputError(
                f"input '{name}' dimension {axis} is {dim}; the engine's optimization profile "
                f"allows {low}..{high}"
            )


def batch_limits(ranges: Mapping[str, ShapeRange], *, where: str) -> tuple[int, int]:
    """The smallest and largest batch every input's profile allows."""
    low = max(allowed.min[0] for allowed in ranges.values())
    high = min(allowed.max[0] for allowed in ranges.values())
    if low > high or high < 1:
        raise ConfigError(f"{where}: the inputs' profiles allow no common batch size")
    return max(low, 1), high


def split_batch(rows: int, *, min_rows: int, max_rows: int) -> list[Chunk]:
    """Cut ``rows`` into chunks of at most ``max_rows``; a chunk under ``min_rows`` is padded."""
    chunks = []
    for start in range(0, rows, max_rows):
        stop = min(start + max_rows, rows)
        chunks.append(Chunk(start, stop, max(stop - start, min_rows)))
    return chunks


def take_chunk(inputs: Mapping[str, Array], chunk: Chunk) -> dict[str, Array]:
    """The chunk's rows of every input, zero-padded up to ``chunk.rows``."""
    taken = {}
    for name, array in inputs.items():
        part = array[chunk.start : chunk.stop]
        padding = chunk.rows - len(part)
        if padding:
            part = np.concatenate([part, np.zeros((padding, *part.shape[1:]), part.dtype)])
        taken[name] = part
    return taken


def join_chunks(parts: Sequence[Mapping[str, Array]], chunks: Sequence[Chunk]) -> dict[str, Array]:
    """The outputs of every chunk, padding rows dropped, in batch order."""
    return {
        name: np.concatenate(
            [
                part[name][: chunk.stop - chunk.start]
                for part, chunk in zip(parts, chunks, strict=True)
            ]
        )
        for name in parts[0]
    }


@dataclass(slots=True)
class _Instance:
    runtime: Any
    engine: Any
    context: Any
    stream: torch.cuda.Stream


class TensorRTExecutor(ThreadedExecutor[_Instance]):
    backend: ClassVar[str] = "tensorrt"

    def __init__(
        self,
        *,
        instances: list[_Instance],
        inputs: tuple[DeclaredTensor, ...],
        outputs: tuple[DeclaredTensor, ...],
        ranges: dict[str, ShapeRange],
        device: torch.device,
        path: Path,
    ) -> None:
        self._ranges = ranges
        self._device = device
        self._batched = all(tensor.shape[:1] == (-1,) for tensor in inputs)
        self._limits = batch_limits(ranges, where=str(path)) if self._batched else (1, 1)
        super().__init__(
            instances=instances,
            inputs=inputs,
            outputs=outputs,
            device=str(device),
            name=f"tensorrt-{path.parent.parent.name}",
        )

    def _run_sync(self, instance: _Instance, inputs: Mapping[str, Array]) -> dict[str, Array]:
        check_inputs(inputs, self._inputs)
        for tensor in self._inputs:
            shape = inputs[tensor.name].shape
            check_shape(tensor.name, shape, self._ranges[tensor.name], batched=self._batched)
        try:
            with torch.cuda.device(self._device):
                if not self._batched:
                    return self._execute(instance, inputs)
                rows = len(inputs[self._inputs[0].name])
                low, high = self._limits
                chunks = split_batch(rows, min_rows=low, max_rows=high)
                parts = [self._execute(instance, take_chunk(inputs, chunk)) for chunk in chunks]
                return join_chunks(parts, chunks)
        except SluiceError:
            raise
        except Exception as exc:  # torch (buffers, copies) and tensorrt raise plain errors
            raise translate(exc) from exc

    def _execute(self, instance: _Instance, arrays: Mapping[str, Array]) -> dict[str, Array]:
        """One run of the engine on shapes the profile accepts."""
        context = instance.context
        with torch.cuda.stream(instance.stream):
            buffers = {}
            for tensor in self._inputs:
                device_tensor = to_tensor(arrays[tensor.name], tensor.datatype, self._device)
                buffers[tensor.name] = device_tensor.contiguous()
                if not context.set_input_shape(tensor.name, tuple(device_tensor.shape)):
                    raise InvalidInputError(
                        f"TensorRT rejected shape {list(device_tensor.shape)} for input "
                        f"'{tensor.name}'"
                    )
            for tensor in self._outputs:
                shape = tuple(int(dim) for dim in context.get_tensor_shape(tensor.name))
                if any(dim < 0 for dim in shape):
                    raise ExecutorError(
                        f"output '{tensor.name}' has a data-dependent shape {list(shape)}, "
                        "which the TensorRT executor does not support"
                    )
                dtype = TORCH_DTYPES[tensor.datatype]
                buffers[tensor.name] = torch.empty(shape, dtype=dtype, device=self._device)
            for name, buffer in buffers.items():
                context.set_tensor_address(name, buffer.data_ptr())
            if not context.execute_async_v3(instance.stream.cuda_stream):
                raise ExecutorError("TensorRT failed to run the batch (its log says why)")
        instance.stream.synchronize()
        return {tensor.name: to_array(buffers[tensor.name]) for tensor in self._outputs}

    def _release(self) -> None:
        """The contexts and engines went with the threads; return cached device memory."""
        torch.cuda.empty_cache()


def import_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        raise ConfigError(f"the tensorrt package is not usable here: {exc}") from exc


def describe_engine(
    trt: ModuleType, engine: Any, path: Path
) -> tuple[tuple[DeclaredTensor, ...], tuple[DeclaredTensor, ...], dict[str, ShapeRange]]:
    """The engine's I/O tensors, and the shapes profile 0 allows for each input."""
    inputs: list[DeclaredTensor] = []
    outputs: list[DeclaredTensor] = []
    ranges: dict[str, ShapeRange] = {}
    for index in range(engine.num_io_tensors):
        name = str(engine.get_tensor_name(index))
        where = f"{path}: tensor '{name}'"
        if engine.is_shape_inference_io(name):
            raise ConfigError(f"{where} is a shape tensor, which Sluice does not support")
        datatype = datatype_for(engine.get_tensor_dtype(name).name, where=where)
        shape = tuple(int(dim) for dim in engine.get_tensor_shape(name))
        declared = DeclaredTensor(name, datatype, shape)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            outputs.append(declared)
            continue
        inputs.append(declared)
        if -1 in shape:
            low, opt, high = engine.get_tensor_profile_shape(name, _PROFILE)
            ranges[name] = ShapeRange(
                tuple(int(d) for d in low), tuple(int(d) for d in opt), tuple(int(d) for d in high)
            )
        else:
            ranges[name] = ShapeRange.fixed(shape)
    return tuple(inputs), tuple(outputs), ranges


class TensorRTFactory(ExecutorFactory):
    backend: ClassVar[str] = "tensorrt"
    filenames: ClassVar[tuple[str, ...]] = ("model.plan",)

    def load(self, path: Path, options: LoadOptions) -> Executor:
        trt = import_tensorrt()
        device = choose_device(options.device or "cuda")
        if device.type != "cuda":
            raise ConfigError(f"{path}: a TensorRT engine runs only on a CUDA device")
        plan = path.read_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            instances = [
                _deserialize(trt, logger, plan, path) for _ in range(options.instance_count)
            ]
        inputs, outputs, ranges = describe_engine(trt, instances[0].engine, path)
        profiles = instances[0].engine.num_optimization_profiles
        log.info(
            "tensorrt %s: %s on %s, %d instance(s), profile %d of %d: %s",
            trt.__version__,
            path,
            device,
            options.instance_count,
            _PROFILE,
            profiles,
            {name: f"{r.min}..{r.max}" for name, r in ranges.items()},
        )
        return TensorRTExecutor(
            instances=instances,
            inputs=inputs,
            outputs=outputs,
            ranges=ranges,
            device=device,
            path=path,
        )


def _deserialize(trt: ModuleType, logger: Any, plan: bytes, path: Path) -> _Instance:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ConfigError(
            f"{path}: TensorRT cannot deserialize the engine (built by another TensorRT "
            "version or for another GPU?)"
        )
    context = engine.create_execution_context()
    if context is None:
        raise ConfigError(f"{path}: TensorRT cannot create an execution context")
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves it untyped
    if not context.set_optimization_profile_async(_PROFILE, stream.cuda_stream):
        raise ConfigError(f"{path}: TensorRT cannot select optimization profile {_PROFILE}")
    stream.synchronize()
    return _Instance(runtime=runtime, engine=engine, context=context, stream=stream)
