"""PyTorch backend: ``torch.export`` programs (``model.pt2``) and TorchScript (``model.pt``).

One module serves ``instance_count`` worker threads; each batch runs under
``torch.inference_mode()`` (on a GPU, on its instance's own CUDA stream). An exported
program declares its tensors; a TorchScript file declares none, so its config must. With
``compile`` the module goes through ``torch.compile`` and warm-up batches before the load
returns, so a version reports ready only once it is compiled. The module is named after
the backend, not the library, so ``import torch`` can never mean this file.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.export.passes import move_to_device_pass

from sluice.errors import (
    ConfigError,
    ExecutorError,
    InvalidInputError,
    SluiceError,
)
from sluice.executors._threads import ThreadedExecutor
from sluice.executors.base import DeclaredTensor, Executor, ExecutorFactory, LoadOptions
from sluice.tensors import Array
from sluice_client.tensors import DATATYPES

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_DATATYPE_OF = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# Messages of torch errors caused by the tensors a caller sent (not by the model or device).
_INPUT_MISTAKE = re.compile(r"size|shape|dtype|expected|guard", re.IGNORECASE)
_DEVICE_MISTAKE = re.compile(r"device", re.IGNORECASE)

# Sizes given to every variable dimension of the warm-up batches: torch.compile builds a
# size-generic graph from 2, and specializes on 1 (a batch of one) with a graph of its own.
_WARM_UP_SIZES = (2, 1)


def datatype_of(dtype: torch.dtype, *, where: str) -> str:
    name = _DATATYPE_OF.get(dtype)
    if name is None:
        raise ConfigError(f"{where} has torch dtype {dtype}, which Sluice cannot serve")
    return name


def check_inputs(inputs: Mapping[str, Array], declared: Sequence[DeclaredTensor]) -> None:
    """Reject inputs whose names, datatypes, ranks or fixed dimensions differ from ``declared``."""
    expected = {tensor.name for tensor in declared}
    if set(inputs) != expected:
        raise InvalidInputError(
            f"the model takes inputs {sorted(expected)}, the batch has {sorted(inputs)}"
        )
    for tensor in declared:
        array = inputs[tensor.name]
        if array.dtype != DATATYPES[tensor.datatype].numpy:
            raise InvalidInputError(
                f"input '{tensor.name}' holds {array.dtype}; the model takes {tensor.datatype}"
            )
        fits = array.ndim == len(tensor.shape) and all(
            want in (-1, got) for want, got in zip(tensor.shape, array.shape, strict=False)
        )
        if not fits:
            raise InvalidInputError(
                f"input '{tensor.name}' has shape {list(array.shape)}; the model takes "
                f"{list(tensor.shape)} (-1: any size)"
            )


def to_tensor(array: Array, datatype: str, device: torch.device) -> torch.Tensor:
    """A numpy array as a torch tensor on ``device``; zero-copy on the CPU when writable."""
    if not array.flags.writeable:  # torch.from_numpy cannot share read-only memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    if datatype == "BF16":  # numpy has no bfloat16: the words travel as uint16
        tensor = tensor.view(torch.bfloat16)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


def to_array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return tensor.cpu().numpy()


def translate(exc: Exception) -> SluiceError:
    """A torch exception as Sluice's error: bad tensors are the caller's, the rest the
    backend's (CUDA out-of-memory included: it may pass, so it stays transient)."""
    detail = _last_line(str(exc)) or type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ExecutorError(f"torch ran out of device memory: {detail}")
    text = str(exc)
    caller_made = _INPUT_MISTAKE.search(text) and not _DEVICE_MISTAKE.search(text)
    if isinstance(exc, RuntimeError | AssertionError | ValueError) and caller_made:
        return InvalidInputError(f"the model rejected the inputs: {detail}")
    return ExecutorError(f"torch failed: {type(exc).__name__}: {detail}")


def _last_line(text: str) -> str:
    """TorchScript errors carry a whole traceback; the cause is its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def choose_device(requested: str | None) -> torch.device:
    """The device asked for, or the first CUDA device when there is one and none was asked."""
    if requested is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"unknown torch device '{requested}'") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{requested}' asked for, but torch sees no CUDA device")
        return torch.device("cuda", device.index or 0)
    if device.type != "cpu":
        raise ConfigError(f"device '{requested}' is not supported; use cpu or cuda")
    return device


@dataclass(frozen=True, slots=True)
class _Instance:
    """What one worker thread owns: the (shared, read-only) module and its CUDA stream."""

    module: Callable[..., Any]
    stream: torch.cuda.Stream | None


class PyTorchExecutor(ThreadedExecutor[_Instance]):
    backend: ClassVar[str] = "pytorch"

    def __init__(
        self,
        *,
        module: Callable[..., Any],
        inputs: tuple[DeclaredTensor, ...],
        outputs: tuple[DeclaredTensor, ...],
        device: torch.device,
        instance_count: int,
        name: str,
    ) -> None:
        self._device = device
        super().__init__(
            instances=[_Instance(module, new_stream(device)) for _ in range(instance_count)],
            inputs=inputs,
            outputs=outputs,
            device=str(device),
            name=f"torch-{name}",
        )

    def _run_sync(self, instance: _Instance, inputs: Mapping[str, Array]) -> dict[str, Array]:
        check_inputs(inputs, self._inputs)
        try:
            with torch.inference_mode(), _on_stream(instance.stream):
                args = [to_tensor(inputs[t.name], t.datatype, self._device) for t in self._inputs]
                produced = collect_outputs(instance.module(*args), self._outputs)
                return {name: to_array(tensor) for name, tensor in produced.items()}
        except SluiceError:
            raise
        except Exception as exc:  # torch raises plain RuntimeError and friends
            raise translate(exc) from exc

    def _release(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def collect_outputs(result: Any, declared: Sequence[DeclaredTensor]) -> dict[str, torch.Tensor]:
    """Name what a module returned: a dict by key, a tuple or list by position, a tensor alone."""
    names = [tensor.name for tensor in declared]
    if isinstance(result, torch.Tensor):
        values: list[Any] = [result]
    elif isinstance(result, Mapping):
        missing = [name for name in names if name not in result]
        if missing:
            raise ExecutorError(
                f"the model returned no output(s) {missing} (it has {list(result)})"
            )
        values = [result[name] for name in names]
    elif isinstance(result, tuple | list):
        values = list(result)
    else:
        raise ExecutorError(f"the model returned {type(result).__name__}, not tensors")
    if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
        raise ExecutorError(f"the model returned {len(values)} value(s), expected tensors {names}")
    produced = dict(zip(names, values, strict=True))
    for tensor in declared:
        got = _DATATYPE_OF.get(produced[tensor.name].dtype)
        if got != tensor.datatype:
            raise ExecutorError(
                f"output '{tensor.name}' came back as {produced[tensor.name].dtype}; "
                f"the model declares {tensor.datatype}"
            )
    return produced


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream of the instance's own on a GPU; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch leaves it untyped


@contextlib.contextmanager
def _on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def describe_program(
    program: torch.export.ExportedProgram, path: Path
) -> tuple[tuple[DeclaredTensor, ...], tuple[DeclaredTensor, ...]]:
    """An exported program's user inputs and outputs from its signature and fake tensors."""
    signature = program.graph_signature
    nodes = {node.name: node for node in program.graph.nodes}
    input_names = _tensor_names(signature.user_inputs, path, "input")
    output_names = _tensor_names(signature.user_outputs, path, "output")
    in_spec = program.call_spec.in_spec
    if in_spec is None or in_spec.child(1).num_children or in_spec.num_leaves != len(input_names):
        raise ConfigError(f"{path}: only programs taking positional tensors are supported")
    public_names = _public_output_names(program.call_spec.out_spec, output_names)
    inputs = tuple(_from_fake(name, nodes[name].meta.get("val"), path) for name in input_names)
    outputs = tuple(
        _from_fake(public, nodes[node].meta.get("val"), path)
        for public, node in zip(public_names, output_names, strict=True)
    )
    return inputs, outputs


def _public_output_names(out_spec: Any, graph_names: list[str]) -> list[str]:
    """A program returning a dict names its outputs by the keys; otherwise by graph node."""
    if out_spec is None or out_spec.type is not dict or len(out_spec.context) != len(graph_names):
        return graph_names
    return [str(key) for key in out_spec.context]


def _tensor_names(names: Any, path: Path, kind: str) -> list[str]:
    listed = list(names)
    if not all(isinstance(name, str) for name in listed):
        raise ConfigError(f"{path}: every {kind} must be a tensor (the program has {listed})")
    return [str(name) for name in listed]


def _from_fake(name: str, value: Any, path: Path) -> DeclaredTensor:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{path}: '{name}' is not a tensor in the exported program")
    shape = tuple(-1 if isinstance(dim, torch.SymInt) else int(dim) for dim in value.shape)
    return DeclaredTensor(name, datatype_of(value.dtype, where=f"{path}: '{name}'"), shape)


def _check_declared(tensors: tuple[DeclaredTensor, ...], path: Path) -> None:
    for tensor in tensors:
        if tensor.datatype not in TORCH_DTYPES:
            raise ConfigError(
                f"{path}: tensor '{tensor.name}' is {tensor.datatype}, which torch cannot hold"
            )


class PyTorchFactory(ExecutorFactory):
    backend: ClassVar[str] = "pytorch"
    filenames: ClassVar[tuple[str, ...]] = ("model.pt2", "model.pt")

    def __init__(self, *, compile_backend: str = "inductor") -> None:
        self._compile_backend = compile_backend

    def load(self, path: Path, options: LoadOptions) -> Executor:
        device = choose_device(options.device)
        try:
            module, inputs, outputs = self._load_file(path, device, options)
            if options.compile:
                module = self._compile(module, inputs, device)
        except SluiceError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"{path}: torch cannot load the model: {_last_line(str(exc))}"
            ) from exc
        log.info(
            "pytorch: %s on %s, %d instance(s)%s",
            path,
            device,
            options.instance_count,
            f", compiled ({self._compile_backend})" if options.compile else "",
        )
        return PyTorchExecutor(
            module=module,
            inputs=inputs,
            outputs=outputs,
            device=device,
            instance_count=options.instance_count,
            name=path.parent.parent.name,
        )

    def _load_file(
        self, path: Path, device: torch.device, options: LoadOptions
    ) -> tuple[Callable[..., Any], tuple[DeclaredTensor, ...], tuple[DeclaredTensor, ...]]:
        if path.suffix == ".pt2":
            program = torch.export.load(path)
            if device.type != "cpu":
                program = move_to_device_pass(program, device)
            inputs, outputs = describe_program(program, path)
            return program.module(), inputs, outputs
        if options.declared_inputs is None or options.declared_outputs is None:
            raise ConfigError(
                f"{path}: a TorchScript file names no tensors; list 'inputs' and 'outputs' "
                "in the model's config.yaml (or export the model with torch.export to model.pt2)"
            )
        _check_declared((*options.declared_inputs, *options.declared_outputs), path)
        script = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        script.eval()
        return script, options.declared_inputs, options.declared_outputs

    def _compile(
        self, module: Callable[..., Any], inputs: tuple[DeclaredTensor, ...], device: torch.device
    ) -> Callable[..., Any]:
        """``torch.compile`` the module and run warm-up batches, so it is compiled before it
        serves (a batch of one gets its own graph, so it is warmed up too)."""
        compiled: Callable[..., Any] = torch.compile(
            module, backend=self._compile_backend, dynamic=True
        )
        with torch.inference_mode():
            for size in _WARM_UP_SIZES:
                compiled(*(_zeros(tensor, size, device) for tensor in inputs))
        return compiled


def _zeros(tensor: DeclaredTensor, size: int, device: torch.device) -> torch.Tensor:
    shape = [size if dim == -1 else dim for dim in tensor.shape]
    return torch.zeros(shape, dtype=TORCH_DTYPES[tensor.datatype], device=device)
