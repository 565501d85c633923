"""Messages the server cannot decode, and strings past their bounds, get INVALID_ARGUMENT
with a request id and a count; a stream that meets one answers what it had accepted and
then ends with that status, never OK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import model_service_pb2 as models
from tests.conftest import RunningServer

BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding bytes that are not UTF-8
CORRUPT = b"\xff\xff\xff\xff"


def simple(request_id: str) -> pb.ModelInferRequest:
    data = np.ones((1, 16), dtype=np.int32).tobytes()
    return pb.ModelInferRequest(
        model_name="simple",
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[data, data],
    )


def count(server: RunningServer, method: str, code: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "sluice_requests_total", {"method": method, "model": "", "code": code}
    )
    return value or 0.0


@pytest.mark.parametrize("raw", [BAD_UTF8, CORRUPT], ids=["bad utf-8", "corrupt"])
@pytest.mark.parametrize(
    "method",
    [
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/sluice.v1.ModelService/GetModelHistory",
        "/sluice.v1.GenerationService/CountTokens",
    ],
)
async def test_an_undecodable_unary_request_is_invalid_argument(
    server: RunningServer, method: str, raw: bytes
) -> None:
    short = method.rsplit("/", 1)[-1]
    before = count(server, short, "INVALID_ARGUMENT")
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(method)(raw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(info.value.details())
    assert "could not be decoded" in details and "request id" in details
    trailers = dict(info.value.trailing_metadata() or ())
    assert trailers["x-request-id"] in details
    async with asyncio.timeout(5):  # counted as the call ends, just after the client hears
        while count(server, short, "INVALID_ARGUMENT") < before + 1:
            await asyncio.sleep(0.001)
    assert count(server, short, "INVALID_ARGUMENT") == before + 1


async def test_an_undecodable_generate_request_is_invalid_argument(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_stream("/sluice.v1.GenerationService/Generate")(BAD_UTF8)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def messages(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_a_stream_answers_what_came_before_an_undecodable_message_then_fails(
    server: RunningServer,
) -> None:
    good = [simple(f"r{i}").SerializeToString() for i in range(3)]
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(messages(*good, BAD_UTF8, simple("after").SerializeToString()))
        answered = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in call:
                answered.append(response.infer_response.id)
    assert answered == ["r0", "r1", "r2"]  # "after" was never read: the status says so
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 4 of the ModelStreamInfer stream" in str(info.value.details())


def start(request_id: str, max_new_tokens: int = 12) -> bytes:
    return gen.GenerateStreamRequest(
        start=gen.StartGeneration(
            request_id=request_id,
            request=gen.GenerateRequest(
                model_name="tiny_llama",
                prompt="Once upon a time",
                parameters=gen.SamplingParameters(max_new_tokens=max_new_tokens),
            ),
        )
    ).SerializeToString()


@pytest.mark.parametrize(
    "bad",
    [BAD_UTF8, gen.GenerateStreamRequest().SerializeToString()],
    ids=["undecodable", "neither start nor cancel"],
)
async def test_a_generation_session_finishes_its_generations_before_failing(
    server: RunningServer, bad: bytes
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/sluice.v1.GenerationService/GenerateStream",
            response_deserializer=gen.GenerateStreamResponse.FromString,
        )(messages(start("a"), bad, start("never")))
        endings: dict[str, int] = {}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in call:
                if response.chunk.finish_reason:
                    endings[response.request_id] = response.chunk.finish_reason
    assert endings == {"a": gen.FINISH_REASON_LENGTH}  # ran to its end, then the status
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2 of" in str(info.value.details())


@pytest.mark.parametrize(
    ("method", "message", "field"),
    [
        (
            "/inference.GRPCInferenceService/ModelMetadata",
            pb.ModelMetadataRequest(name="m" * 257),
            "name",
        ),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            pb.ModelInferRequest(model_name="simple", id="i" * 300),
            "id",
        ),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            pb.ModelInferRequest(
                model_name="simple",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="n" * 1000, datatype="INT32")],
            ),
            "name",
        ),
        (
            "/sluice.v1.ModelService/GetModelHistory",
            models.GetModelHistoryRequest(model_name="é" * 200),  # 400 bytes of UTF-8
            "model_name",
        ),
    ],
    ids=["model name", "request id", "tensor name", "multi-byte name"],
)
async def test_strings_past_their_bound_are_refused(
    server: RunningServer, method: str, message: Message, field: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(method)(message.SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(info.value.details())
    assert f"field '{field}'" in details and "at most" in details
    assert len(details) < 500  # the value itself is not echoed back in full


async def test_a_long_request_id_in_metadata_is_refused_and_never_echoed(
    server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(
                pb.ServerLiveRequest().SerializeToString(), metadata=(("x-request-id", "x" * 200),)
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(info.value.trailing_metadata() or ())
    assert trailers["x-request-id"] != "x" * 200 and len(trailers["x-request-id"]) < 40


@pytest.mark.parametrize(
    "name",
    ["../simple", "simple/1", "a\x00b", "..", ".sluice", "x" * 256],
    ids=["dot-dot", "separator", "nul", "parent", "state folder", "255+ bytes"],
)
async def test_names_that_are_not_plain_folder_names_never_reach_the_file_system(
    server: RunningServer, name: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/sluice.v1.ModelService/GetModelHistory")(
                models.GetModelHistoryRequest(model_name=name).SerializeToString()
            )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
