"""Bad input over the wire: every case gets the right status and an actionable message, and
the server keeps serving the next request."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, StartServer

Tensor = pb.ModelInferRequest.InferInputTensor
ONES = np.ones((1, 16), dtype=np.int32)


def simple(
    *,
    shapes: tuple[list[int], list[int]] = ([1, 16], [1, 16]),
    datatypes: tuple[str, str] = ("INT32", "INT32"),
    raw: list[bytes] | None = None,
    names: tuple[str, ...] = ("INPUT0", "INPUT1"),
    **fields: object,
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=str(fields.pop("model_name", "simple")),
        inputs=[
            Tensor(name=n, datatype=d, shape=s)
            for n, d, s in zip(names, datatypes, shapes, strict=False)
        ],
        raw_input_contents=raw if raw is not None else [ONES.tobytes()] * len(names),
        **fields,  # type: ignore[arg-type]
    )


def passthrough_bytes(raw_bytes: bytes, shape: list[int]) -> pb.ModelInferRequest:
    """A passthrough request whose BYTES input is ``raw_bytes``; other inputs are valid."""
    request = pb.ModelInferRequest(model_name="passthrough")
    for name, dtype in [
        ("BOOL", "?"),
        ("INT8", "i1"),
        ("INT16", "<i2"),
        ("INT32", "<i4"),
        ("INT64", "<i8"),
        ("UINT8", "u1"),
        ("UINT16", "<u2"),
        ("UINT32", "<u4"),
        ("UINT64", "<u8"),
        ("FP16", "<f2"),
        ("FP32", "<f4"),
        ("FP64", "<f8"),
    ]:
        request.inputs.add(name=name, datatype=name, shape=[1, 2])
        request.raw_input_contents.append(np.zeros((1, 2), dtype=dtype).tobytes())
    request.inputs.add(name="BYTES", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw_bytes)
    return request


@dataclass(frozen=True)
class Case:
    id: str
    request: pb.ModelInferRequest
    code: grpc.StatusCode
    words: tuple[str, ...]


CASES = [
    Case(
        "wrong dtype",
        simple(datatypes=("FP32", "INT32")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT0", "FP32", "INT32"),
    ),
    Case(
        "wrong rank",
        simple(shapes=([16], [1, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT0", "rank"),
    ),
    Case(
        "negative dim",
        simple(shapes=([1, -16], [1, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT0", "dimension 1"),
    ),
    Case(
        "wrong fixed dim",
        simple(shapes=([1, 15], [1, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT0", "must be 16"),
    ),
    Case(
        "batch too large",
        simple(shapes=([1000, 16], [1000, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("batch size 1000", "1 to 32"),
    ),
    Case(
        "huge dims",
        passthrough_bytes(b"", [1, 2**40]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("BYTES",),
    ),
    Case(
        "byte size mismatch",
        simple(raw=[ONES.tobytes()[:-4], ONES.tobytes()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT0", "60 bytes", "64 bytes expected"),
    ),
    Case(
        "bad BYTES prefix",
        passthrough_bytes(struct.pack("<I", 100) + b"abc", [1, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("BYTES", "claims 100 bytes"),
    ),
    Case(
        "BYTES leftover",
        passthrough_bytes(struct.pack("<I", 1) + b"ab", [1, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("BYTES", "left over"),
    ),
    Case("missing input", simple(names=("INPUT0",)), grpc.StatusCode.INVALID_ARGUMENT, ("INPUT1",)),
    Case(
        "unknown input",
        simple(
            names=("INPUT0", "INPUT1", "INPUT2"),
            datatypes=("INT32",) * 3,  # type: ignore[arg-type]
            shapes=([1, 16], [1, 16], [1, 16]),
        ),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INPUT2", "expected inputs"),
    ),
    Case(
        "raw count mismatch",
        simple(raw=[ONES.tobytes()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("raw_input_contents", "1 entries for 2 inputs"),
    ),
    Case(
        "mismatched batch",
        simple(shapes=([1, 16], [2, 16]), raw=[ONES.tobytes(), ONES.tobytes() * 2]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("batch size",),
    ),
    Case("no data", simple(raw=[]), grpc.StatusCode.INVALID_ARGUMENT, ("INPUT0", "0 values")),
    Case(
        "unknown output",
        simple(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="NOPE")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("NOPE", "OUTPUT0"),
    ),
    Case("unknown model", simple(model_name="nope"), grpc.StatusCode.NOT_FOUND, ("nope", "simple")),
    Case(
        "unknown version",
        simple(model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        ("version '7'", "loaded versions: 1"),
    ),
]


@pytest.fixture
async def small_server(start_server: StartServer) -> RunningServer:
    return await start_server(max_message_bytes=64 * 1024)


@pytest.fixture
async def stub(small_server: RunningServer) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(small_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def assert_still_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = await stub.ModelInfer(simple())
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.int32), (ONES + ONES).ravel()
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_gets_clear_status(
    stub: pb_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(case.request)
    assert info.value.code() == case.code
    details = info.value.details() or ""
    for word in case.words:
        assert word in details
    assert "request id" in details
    await assert_still_serving(stub)


async def test_oversize_message_is_resource_exhausted(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    big = np.ones((1, 32 * 1024), dtype=np.int32).tobytes()  # 128 KiB > 64 KiB limit
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(simple(raw=[big, big]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serving(stub)


async def test_typed_contents_are_accepted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(range(16))
    response = await stub.ModelInfer(request)
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.int32), np.arange(16) * 2
    )


async def test_typed_value_out_of_range_is_invalid(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = passthrough_bytes(struct.pack("<I", 1) + b"a", [1, 1])
    int8 = request.inputs[1]
    request.raw_input_contents[:] = []
    del request.inputs[:]
    request.inputs.append(int8)
    int8.contents.int_contents.extend([1000, 1])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INT8" in (info.value.details() or "")


async def test_unknown_parameters_are_ignored(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = simple(id="req-1")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["priority"].uint64_param = 1
    request.parameters["whatever"].double_param = 0.5
    response = await stub.ModelInfer(request)
    assert response.id == "req-1"
