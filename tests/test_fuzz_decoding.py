"""Hostile inputs, generated: the request decoding and validation layer (bytes -> protobuf
-> domain tensors, BYTES prefixes, shapes, parameters, generation parameters) raises only
Sluice's own errors, and decoding allocates no more than the call is weighed for.

The examples are derandomized (the same ones every run) and bounded in number.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.errors import InvalidInputError, SluiceError
from sluice.executors.causal_lm import text_request
from sluice.generation.sampling import SamplingParams
from sluice.tensors import (
    IOSpec,
    TensorSpec,
    check_inputs,
    check_requested_outputs,
    decode_checked,
    expected_reply_bytes,
)
from sluice.transport import convert
from sluice.transport.generation_convert import generation_request
from sluice.transport.interceptors._wrap import decode_message
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_client.tensors import DATATYPES

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DATATYPE_NAMES = sorted(DATATYPES)
# Every datatype, batched with a variable width; and a model with fixed dimensions.
EVERY_TYPE = IOSpec(
    inputs=tuple(TensorSpec(name, name, (-1,)) for name in DATATYPE_NAMES),
    outputs=tuple(TensorSpec(f"{name}_OUT", name, (-1,)) for name in DATATYPE_NAMES),
    max_batch_size=8,
)
FIXED = IOSpec(
    inputs=(TensorSpec("x", "FP32", (3, 4)), TensorSpec("s", "BYTES", (2,), optional=True)),
    outputs=(TensorSpec("y", "FP32", (5,)),),
    max_batch_size=0,
)
TYPED_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)

names = st.one_of(st.sampled_from([*DATATYPE_NAMES, "x", "s"]), st.text(max_size=12), st.just(""))
dims = st.one_of(
    st.integers(min_value=-2, max_value=6),
    st.sampled_from([2**31, 2**40, 2**62, -(2**63)]),
)


@st.composite
def input_tensors(draw: st.DrawFn) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(names),
        datatype=draw(st.one_of(st.sampled_from(DATATYPE_NAMES), st.text(max_size=6))),
        shape=draw(st.lists(dims, max_size=4)),
    )
    if draw(st.booleans()):  # typed contents, in any field (right or wrong)
        for field in draw(st.lists(st.sampled_from(TYPED_FIELDS), max_size=2, unique=True)):
            count = draw(st.integers(0, 8))
            values: list[Any]
            if field == "bytes_contents":
                values = [draw(st.binary(max_size=6)) for _ in range(count)]
            elif field == "bool_contents":
                values = [draw(st.booleans()) for _ in range(count)]
            elif field in ("fp32_contents", "fp64_contents"):
                values = [draw(st.floats(width=32)) for _ in range(count)]
            elif field.startswith("uint"):
                values = [draw(st.integers(0, 2**32 - 1)) for _ in range(count)]
            else:
                values = [draw(st.integers(-(2**31), 2**31 - 1)) for _ in range(count)]
            getattr(tensor.contents, field).extend(values)
    raw = draw(st.one_of(st.none(), st.binary(max_size=64), st.sampled_from(_BYTES_RAW)))
    return tensor, raw


_BYTES_RAW = [
    b"\x02\x00\x00\x00hi",
    b"\xff\xff\xff\xffx",  # a length far past the end
    b"\x00\x00\x00\x00" * 8,
    b"\x01\x00\x00",  # a torn length
]


@st.composite
def chaotic_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Anything at all in every field."""
    request = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=8)),
        id=draw(st.text(max_size=8)),
    )
    raws = []
    for tensor, raw in draw(st.lists(input_tensors(), max_size=4)):
        request.inputs.append(tensor)
        raws.append(raw)
    if draw(st.booleans()):
        request.raw_input_contents.extend(r or b"" for r in raws[: draw(st.integers(0, 5))])
    for name in draw(st.lists(names, max_size=3)):
        request.outputs.add(name=name)
    if draw(st.booleans()):
        _parameter(draw, request)
    return request


def _parameter(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    parameter = request.parameters[draw(st.sampled_from(["timeout", "priority", "other"]))]
    choice = draw(st.integers(0, 4))
    if choice == 0:
        parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif choice == 1:
        parameter.string_param = draw(st.text(max_size=4))
    elif choice == 2:
        parameter.double_param = draw(st.floats())
    elif choice == 3:
        parameter.bool_param = draw(st.booleans())
    else:
        parameter.uint64_param = draw(st.integers(0, 2**64 - 1))


def _valid_raw(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    count = int(np.prod(shape))
    if datatype != "BYTES":
        return draw(
            st.binary(
                min_size=count * DATATYPES[datatype].itemsize,
                max_size=count * DATATYPES[datatype].itemsize,
            )
        )
    items = [draw(st.binary(max_size=5)) for _ in range(count)]
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


@st.composite
def plausible_requests(draw: st.DrawFn, io: IOSpec) -> pb.ModelInferRequest:
    """A valid request for ``io``, then a few hostile changes to it."""
    request = pb.ModelInferRequest(model_name="m")
    rows = draw(st.integers(1, io.max_batch_size)) if io.batched else None
    for spec in io.inputs:
        if spec.optional and draw(st.booleans()):
            continue
        dims = [draw(st.integers(0, 4)) if d < 0 else d for d in spec.dims]
        shape = [rows, *dims] if rows is not None else dims
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(_valid_raw(draw, spec.datatype, shape))
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, request)
    return request


def _mutate(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if not request.inputs:
        return
    index = draw(st.integers(0, len(request.inputs) - 1))
    tensor = request.inputs[index]
    change = draw(st.integers(0, 6))
    if change == 0 and tensor.shape:
        tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(dims)
    elif change == 1:
        raw = request.raw_input_contents[index]
        request.raw_input_contents[index] = raw[: draw(st.integers(0, len(raw)))]
    elif change == 2:
        request.raw_input_contents[index] = draw(st.sampled_from(_BYTES_RAW))
    elif change == 3:
        request.outputs.add(name=draw(names))
    elif change == 4:
        _parameter(draw, request)
    elif change == 5:
        tensor.datatype = draw(st.sampled_from(DATATYPE_NAMES))
    else:
        tensor.shape.append(draw(dims))


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, IOSpec]:
    io = draw(st.sampled_from([EVERY_TYPE, FIXED]))
    if draw(st.integers(0, 3)) == 0:
        return draw(chaotic_requests()), io
    return draw(plausible_requests(io)), io


def run_pipeline(request: pb.ModelInferRequest, io: IOSpec) -> None:
    """What the server does with a ModelInfer request before queueing it, measured."""
    raw = request.SerializeToString()
    message = decode_message(pb.ModelInferRequest.FromString, raw, "ModelInfer")
    convert.timeout_parameter_s(message)
    domain = convert.infer_request(message)
    checked = check_inputs(domain, io)
    wanted = check_requested_outputs(domain, io)
    expected_reply_bytes(io, wanted, checked.rows)
    budget = 2 * (len(raw) + checked.decoded_bytes) + 64 * 1024
    tracemalloc.start()
    try:
        decode_checked(domain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= budget, (peak, budget, request)


@FUZZ
@given(infer_requests())
def test_infer_requests_fail_only_with_our_errors_and_allocate_within_their_weight(
    case: tuple[pb.ModelInferRequest, IOSpec],
) -> None:
    request, io = case
    try:
        run_pipeline(request, io)
    except SluiceError as exc:
        assert isinstance(exc, InvalidInputError), exc


@FUZZ
@given(st.binary(max_size=256), st.sampled_from(["ModelInfer", "Generate", "GenerateStream"]))
def test_arbitrary_bytes_decode_or_are_invalid_input(raw: bytes, method: str) -> None:
    parse = {
        "ModelInfer": pb.ModelInferRequest.FromString,
        "Generate": gen.GenerateRequest.FromString,
        "GenerateStream": gen.GenerateStreamRequest.FromString,
    }[method]
    try:
        message = decode_message(parse, raw, method)
    except SluiceError as exc:
        assert isinstance(exc, InvalidInputError), exc
        assert "could not be decoded" in exc.message or "at most" in exc.message
    else:
        assert isinstance(message, Message)


sampling = st.builds(
    gen.SamplingParameters,
    max_new_tokens=st.integers(0, 2**32 - 1),
    temperature=st.floats(width=32),
    top_k=st.integers(0, 2**32 - 1),
    top_p=st.floats(width=32),
    repetition_penalty=st.floats(width=32),
    seed=st.integers(0, 2**64 - 1),
    stop_sequences=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=300),
)


@FUZZ
@given(sampling, st.text(max_size=16))
def test_generation_parameters_fail_only_with_our_errors(
    parameters: gen.SamplingParameters, prompt: str
) -> None:
    message = gen.GenerateRequest(model_name="m", prompt=prompt, parameters=parameters)
    try:
        domain = generation_request(message, default_max_new_tokens=16)
    except SluiceError as exc:
        assert isinstance(exc, InvalidInputError), exc
        return
    assert isinstance(domain.params, SamplingParams)
    assert len(domain.params.stop_sequences) <= 16


tensor_values = st.one_of(
    st.binary(max_size=8),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.text(max_size=4),
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed"]
        ),
        st.lists(tensor_values, min_size=0, max_size=3),
    )
)
def test_generation_tensors_fail_only_with_our_errors(inputs: dict[str, list[Any]]) -> None:
    arrays = {name: np.array(values, dtype=object) for name, values in inputs.items()}
    try:
        text_request(arrays, default_max_new_tokens=16)
    except SluiceError as exc:
        assert isinstance(exc, InvalidInputError), exc
