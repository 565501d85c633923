"""ModelStreamInfer over the raw stubs: pipelining, per-request errors, grpc-error mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer


def simple_request(request_id: str, value: int, datatype: str = "INT32") -> pb.ModelInferRequest:
    data = np.full((1, 16), value, dtype=np.int32).tobytes()
    return pb.ModelInferRequest(
        model_name="simple",
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype=datatype, shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[data, data],
    )


async def requests(items: list[pb.ModelInferRequest]) -> AsyncIterator[pb.ModelInferRequest]:
    for item in items:
        yield item


async def test_pipelined_requests_each_get_their_response(server: RunningServer) -> None:
    items = [simple_request(f"r{i}", i) for i in range(40)]
    items[7] = simple_request("r7", 7, datatype="FP32")  # one bad request in the middle
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = [r async for r in stub.ModelStreamInfer(requests(items))]
    by_id = {r.infer_response.id: r for r in responses}
    assert sorted(by_id) == sorted(f"r{i}" for i in range(40))
    assert "datatype FP32" in by_id["r7"].error_message
    for i in (0, 6, 8, 39):
        response = by_id[f"r{i}"]
        assert response.error_message == ""
        assert response.infer_response.parameters["triton_final_response"].bool_param
        out = np.frombuffer(response.infer_response.raw_output_contents[0], np.int32)
        np.testing.assert_array_equal(out, np.full(16, 2 * i))


async def test_grpc_error_header_ends_the_stream_with_a_status(server: RunningServer) -> None:
    items = [simple_request("ok", 1), simple_request("bad", 2, datatype="FP32")]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests(items), metadata=(("triton_grpc_error", "true"),))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_answers_each_request_while_it_stays_open(server: RunningServer) -> None:
    request = simple_request("t", 1)
    request.parameters["timeout"].int64_param = 5_000_000  # Triton's per-request timeout, us
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[pb.ModelInferRequest]:
            while (item := await queue.get()) is not None:
                yield item

        call = stub.ModelStreamInfer(feed())
        await queue.put(request)
        first = await call.read()
        assert first.error_message == "" and first.infer_response.id == "t"
        await queue.put(simple_request("u", 2))
        second = await call.read()
        assert second.infer_response.id == "u"
        await queue.put(None)
        assert await call.read() == grpc.aio.EOF
