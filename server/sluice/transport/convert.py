"""Protobuf <-> domain conversions for the inference protocol."""

from __future__ import annotations

import asyncio
from typing import Any

from sluice.domain import InferRequest, InferResult, InputTensor
from sluice.errors import InvalidInputError
from sluice.registry import IndexEntry
from sluice.repository import ModelSpec
from sluice.stats import Duration, ModelStats
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import model_config_pb2 as mc
from sluice_client.names import CACHE_KEY, DEGRADED_KEY, ENDPOINT_KEY, FALLBACK_KEY, SERVED_BY_KEY
from sluice_client.tensors import to_raw

# Which InferTensorContents field carries each datatype (FP16 / BF16 travel raw only).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_CONFIG_DATATYPE = {
    name: getattr(mc, "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    for name in (
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
        "BF16",
    )
}

PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "tensorrt": "tensorrt_plan",
}


def parameter_value(param: pb.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def timeout_parameter_s(msg: pb.ModelInferRequest) -> float | None:
    """Triton's per-request ``timeout`` parameter (microseconds) in seconds, if set (0:
    none); anything but a non-negative integer is bad input."""
    if "timeout" not in msg.parameters:
        return None
    value = parameter_value(msg.parameters["timeout"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"parameter 'timeout' must be a non-negative integer number of microseconds "
            f"(int64_param or uint64_param), got {type(value).__name__} {str(value)[:40]!r}"
        )
    return value / 1e6 if value else None


def priority_parameter(msg: pb.ModelInferRequest) -> int | None:
    """Triton's per-request ``priority`` parameter (1 is the highest; 0: the default
    level), if set; anything but a non-negative integer is bad input."""
    if "priority" not in msg.parameters:
        return None
    value = parameter_value(msg.parameters["priority"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"parameter 'priority' must be a non-negative integer level (int64_param or "
            f"uint64_param; 1 is the highest, 0 the default), got {type(value).__name__} "
            f"{str(value)[:40]!r}"
        )
    return value


def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> Any:
    """The typed values of an input, from the one contents field its datatype uses."""
    if not tensor.HasField("contents"):
        return None
    filled = [field.name for field, _ in tensor.contents.ListFields()]
    expected = TYPED_FIELD.get(tensor.datatype)
    if len(filled) > 1:
        raise InvalidInputError(
            f"input '{tensor.name}' fills several contents fields ({', '.join(filled)}); "
            f"a {tensor.datatype} tensor's values go in contents.{expected} only"
        )
    if filled and expected is None:
        raise InvalidInputError(
            f"input '{tensor.name}' is {tensor.datatype or '(no datatype)'}, which has no "
            f"typed contents field (it filled contents.{filled[0]}); send it as "
            "raw_input_contents"
        )
    if filled and filled[0] != expected:
        raise InvalidInputError(
            f"input '{tensor.name}' is {tensor.datatype}: its values go in "
            f"contents.{expected}, not contents.{filled[0]}"
        )
    return getattr(tensor.contents, expected) if expected else None


def infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
            "send one raw entry per input, in input order"
        )
    inputs = []
    for index, tensor in enumerate(msg.inputs):
        typed = _typed_contents(tensor)
        inputs.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                raw=raw[index] if raw else None,
                values=typed,
            )
        )
    return InferRequest(
        model=msg.model_name,
        version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=[output.name for output in msg.outputs],
        parameters={key: parameter_value(value) for key, value in msg.parameters.items()},
    )


OFF_LOOP_ELEMENTS = 4096
"""BYTES outputs with more elements than this are encoded in a worker thread: each element
is Python work, and a big reply must not stall the event loop."""
OFF_LOOP_BYTES = 1024 * 1024
"""Numeric outputs larger than this (copied twice on the way to the reply) too."""


async def encoded_reply(result: InferResult) -> bytes:
    """A unary call's reply, encoded: a large one made and encoded in a worker thread (sizing
    a message on the loop, to decide where to encode it, costs a copy of its largest contents
    there), a small one here (the result says which: sizing the message would cost more
    than encoding it)."""
    if _heavy(result):
        return await asyncio.to_thread(lambda: infer_response(result).SerializeToString())
    return infer_response(result).SerializeToString()


async def encoded_stream_reply(result: InferResult) -> bytes:
    """``encoded_reply`` for ModelStreamInfer: the response in its stream message, marked
    final."""
    if _heavy(result):
        return await asyncio.to_thread(lambda: stream_reply(result).SerializeToString())
    return stream_reply(result).SerializeToString()


def stream_reply(result: InferResult) -> pb.ModelStreamInferResponse:
    response = infer_response(result)
    response.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=response)


def _heavy(result: InferResult) -> bool:
    """Whether making the reply is work for a worker thread: many BYTES elements, or many
    bytes of numbers, over all its outputs."""
    elements = size = 0
    for output in result.outputs:
        if output.datatype == "BYTES":
            elements += output.array.size
        else:
            size += output.array.nbytes
    return elements > OFF_LOOP_ELEMENTS or size > OFF_LOOP_BYTES


def infer_response(result: InferResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.version, id=result.id
    )
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.array.shape)
        response.raw_output_contents.append(to_raw(output.array, output.datatype))
    if result.routing is not None:
        response.parameters["sluice_served_by"].string_param = result.served_by
        response.parameters["sluice_fallback"].bool_param = result.routing.fallback
        response.parameters["sluice_attempts"].int64_param = result.routing.attempts
        if result.endpoint:
            response.parameters["sluice_endpoint"].string_param = result.endpoint
        if result.routing.cached:
            response.parameters["sluice_cache_hit"].bool_param = True
        if result.routing.degraded:
            response.parameters["sluice_degraded"].string_param = result.routing.degraded
    return response


def routing_trailers(result: InferResult) -> tuple[tuple[str, str], ...]:
    """Who answered, as trailing metadata (routed results only)."""
    if result.routing is None:
        return ()
    routing = result.routing
    fallback = "true" if routing.fallback else "false"
    marks = ((CACHE_KEY, "hit"),) if routing.cached else ()
    if routing.degraded:
        marks = (*marks, (DEGRADED_KEY, routing.degraded))
    if result.endpoint:
        marks = (*marks, (ENDPOINT_KEY, result.endpoint))
    return ((SERVED_BY_KEY, result.served_by), (FALLBACK_KEY, fallback), *marks)


def model_metadata(spec: ModelSpec, versions: list[str]) -> pb.ModelMetadataResponse:
    batched = spec.io.batched
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=versions,
        platform=PLATFORMS.get(spec.backend, spec.backend),
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=t.shape(batched)
            )
            for t in spec.io.inputs
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=t.shape(batched)
            )
            for t in spec.io.outputs
        ],
    )


def model_config(spec: ModelSpec) -> mc.ModelConfig:
    policy = spec.batching
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORMS.get(spec.backend, spec.backend),
        backend=spec.backend,
        max_batch_size=spec.io.max_batch_size,
        input=[
            mc.ModelInput(
                name=t.name,
                data_type=_CONFIG_DATATYPE[t.datatype],
                dims=t.dims,
                optional=t.optional,
            )
            for t in spec.io.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=_CONFIG_DATATYPE[t.datatype], dims=t.dims)
            for t in spec.io.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(count=spec.instance_count, kind=mc.ModelInstanceGroup.KIND_CPU)
        ],
    )
    if spec.io.batched:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=policy.preferred_batch_sizes,
                max_queue_delay_microseconds=policy.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=policy.max_queue_size),
            )
        )
    if spec.decoupled:
        config.model_transaction_policy.decoupled = True
    config.response_cache.enable = spec.response_cache
    if spec.auto_configured:
        config.parameters["sluice_auto_configured"].string_value = "true"
    config.parameters["sluice_backend"].string_value = spec.backend_rung or spec.backend
    config.parameters["sluice_backend_reason"].string_value = spec.backend_reason
    config.parameters["sluice_device"].string_value = spec.device
    return config


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def model_statistics(name: str, version: str, stats: ModelStats) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    infer = out.inference_stats
    for field in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _duration(getattr(infer, field), getattr(stats, field))
    for size in sorted(stats.batches):
        batch = stats.batches[size]
        row = out.batch_stats.add(batch_size=size)
        _duration(row.compute_input, batch.compute_input)
        _duration(row.compute_infer, batch.compute_infer)
        _duration(row.compute_output, batch.compute_output)
    return out


def repository_index(rows: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=row.name, version=row.version, state=row.state, reason=row.reason
            )
            for row in rows
        ]
    )
