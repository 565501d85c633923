"""ONNX Runtime backend: ``model.onnx`` in ``instance_count`` sessions run in threads."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from sluice.errors import ConfigError, ExecutorError, InvalidInputError
from sluice.executors._threads import ThreadedExecutor
from sluice.executors.base import DeclaredTensor, Executor, ExecutorFactory, LoadOptions
from sluice.tensors import Array

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Preferred order when the settings name none: the fastest installed provider first.
_PROVIDER_LADDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def choose_providers(preferred: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The providers to ask for, in order, from what this onnxruntime build offers."""
    wanted = list(preferred) if preferred else list(_PROVIDER_LADDER)
    chosen = [name for name in wanted if name in available]
    if not chosen:
        raise ConfigError(
            f"none of the ONNX Runtime providers {wanted} is installed; available: "
            f"{list(available)}"
        )
    return chosen


def _declared(args: Sequence[Any], path: Path) -> tuple[DeclaredTensor, ...]:
    tensors = []
    for arg in args:
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise ConfigError(f"{path}: tensor '{arg.name}' has type {arg.type}, not supported")
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
        tensors.append(DeclaredTensor(arg.name, datatype, shape))
    return tuple(tensors)


def _to_ort(array: Array) -> Array:
    """ONNX Runtime reads string tensors only from arrays of ``str``: decode BYTES as UTF-8."""
    if array.dtype != object:
        return array
    try:
        decoded: Array = np.vectorize(
            lambda item: item.decode("utf-8") if isinstance(item, bytes) else str(item),
            otypes=[object],
        )(array)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"a BYTES element is not valid UTF-8, which ONNX string tensors require: {exc}"
        ) from exc
    return decoded


def _from_ort(array: Array) -> Array:
    if array.dtype.kind not in "OU":
        return array
    encoded: Array = np.vectorize(lambda item: str(item).encode("utf-8"), otypes=[object])(array)
    return encoded


class OnnxRuntimeExecutor(ThreadedExecutor[ort.InferenceSession]):
    backend: ClassVar[str] = "onnxruntime"

    def __init__(self, sessions: list[ort.InferenceSession], path: Path) -> None:
        providers = sessions[0].get_providers()
        super().__init__(
            instances=sessions,
            inputs=_declared(sessions[0].get_inputs(), path),
            outputs=_declared(sessions[0].get_outputs(), path),
            device="cuda" if providers[0] != "CPUExecutionProvider" else "cpu",
            name=f"ort-{path.parent.name}",
        )
        self._output_names = [tensor.name for tensor in self._outputs]

    def _run_sync(
        self, session: ort.InferenceSession, inputs: Mapping[str, Array]
    ) -> dict[str, Array]:
        feeds = {name: _to_ort(array) for name, array in inputs.items()}
        try:
            results = session.run(self._output_names, feeds)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise InvalidInputError(f"the model rejected the inputs: {exc}") from exc
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise ExecutorError(f"onnxruntime failed: {exc}") from exc
        return {
            name: _from_ort(np.asarray(value))
            for name, value in zip(self._output_names, results, strict=True)
        }


class OnnxRuntimeFactory(ExecutorFactory):
    backend: ClassVar[str] = "onnxruntime"
    filenames: ClassVar[tuple[str, ...]] = ("model.onnx",)

    def load(self, path: Path, options: LoadOptions) -> Executor:
        on_cpu = options.device == "cpu"  # the capability ladder placed it on the CPU
        preferred = ["CPUExecutionProvider"] if on_cpu else options.settings.providers
        providers = choose_providers(preferred, ort.get_available_providers())
        session_options = ort.SessionOptions()
        spin = "1" if options.settings.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if options.settings.intra_op_threads:
            session_options.intra_op_num_threads = options.settings.intra_op_threads
        try:
            sessions = [
                ort.InferenceSession(str(path), session_options, providers=providers)
                for _ in range(options.instance_count)
            ]
        except Exception as exc:
            raise ConfigError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        placed_on_gpu = options.device is not None and options.device.startswith("cuda")
        if placed_on_gpu and sessions[0].get_providers()[0] == "CPUExecutionProvider":
            raise ConfigError(f"{path}: onnxruntime could not start a GPU provider here")
        log.info(
            "onnxruntime: %s with providers %s (installed: %s), %d instance(s)",
            path,
            sessions[0].get_providers(),
            ort.get_available_providers(),
            options.instance_count,
        )
        return OnnxRuntimeExecutor(sessions, path)
