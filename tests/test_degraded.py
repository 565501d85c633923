"""The degraded tier over a real server on the example ``simple`` ONNX model: once every
candidate failed or is open, the cached answer of the same call (marked ``cache``), then the
configured static answer (marked ``static``), counted and never silent; a static answer that
does not fit the model is a load error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.tracing import Tracing
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import StartServer
from tests.test_response_cache import infer, sample, stub

ONES = np.ones((1, 16), dtype=np.int32)
SEVENS = ", ".join(["7"] * 16)
MINUS_SEVENS = ", ".join(["-7"] * 16)
STATIC = (
    "  outputs:\n"
    f"    - {{name: OUTPUT0, datatype: INT32, shape: [1, 16], data: [{SEVENS}]}}\n"
    f"    - {{name: OUTPUT1, datatype: INT32, shape: [1, 16], data: [{MINUS_SEVENS}]}}\n"
)
DEGRADED = "degraded:\n  from_cache: true\n" + STATIC
FAILING = "faults: {mode: fail}\n"


def request(first: np.ndarray = ONES, rows: int = 1) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[rows, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[
            np.repeat(first, rows, axis=0).astype("<i4").tobytes(),
            np.repeat(ONES, rows, axis=0).tobytes(),
        ],
    )


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for channel in opened:
        await channel.close()


def output(response: pb.ModelInferResponse, index: int) -> np.ndarray:
    shape = tuple(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<i4").reshape(shape)


async def reload_with(
    client: pb_grpc.GRPCInferenceServiceStub, repository: Path, config: str
) -> None:
    (repository / "simple" / "config.yaml").write_text(config)
    await client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))


async def test_a_failing_model_answers_from_the_cache_then_statically_always_marked(
    start_server: StartServer, example_repository: Path, channels: list[grpc.aio.Channel]
) -> None:
    (example_repository / "simple" / "config.yaml").write_text(DEGRADED)
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter)
    server = await start_server(
        repository=example_repository, breaker={"fail_max": 2}, tracing=tracing
    )
    client = stub(server, channels)
    real, trailers = await infer(client, request())
    assert "sluice-degraded" not in trailers
    # from_cache alone keeps answers but never serves them to normal traffic.
    _, trailers = await infer(client, request())
    assert "sluice-cache" not in trailers
    await reload_with(client, example_repository, DEGRADED + FAILING)

    for _ in range(4):  # the breaker opens after two; the tier answers either way
        cached, trailers = await infer(client, request())
        assert trailers["sluice-degraded"] == "cache"
        assert cached.parameters["sluice_degraded"].string_param == "cache"
        assert cached.raw_output_contents == real.raw_output_contents
        assert trailers["x-sluice-served-by"] == "simple/1/onnxruntime"
    breaker = {"model": "simple", "version": "1", "backend": "onnxruntime"}
    assert sample(server, "sluice_breaker_state", **breaker) == 2  # open

    static, trailers = await infer(client, request(first=ONES * 3, rows=2))
    assert trailers["sluice-degraded"] == "static"
    assert static.parameters["sluice_degraded"].string_param == "static"
    np.testing.assert_array_equal(output(static, 0), np.full((2, 16), 7))
    np.testing.assert_array_equal(output(static, 1), np.full((2, 16), -7))

    assert sample(server, "sluice_degraded_responses_total", model="simple", source="cache") == 4
    assert sample(server, "sluice_degraded_responses_total", model="simple", source="static") == 1
    stats = (await client.ModelStatistics(pb.ModelStatisticsRequest(name="simple"))).model_stats
    assert stats[0].execution_count == 0  # the reloaded version never ran a batch
    assert stats[0].inference_stats.cache_hit.count == 4
    await tracing.flush()
    marked = [
        span.attributes["sluice.degraded"]
        for span in exporter.get_finished_spans()
        if span.name == "sluice.degraded" and span.attributes is not None
    ]
    assert sorted(marked) == ["cache"] * 4 + ["static"]


async def test_without_a_static_answer_a_cache_miss_fails_as_before(
    start_server: StartServer, example_repository: Path, channels: list[grpc.aio.Channel]
) -> None:
    config = "degraded: {from_cache: true}\n" + FAILING
    (example_repository / "simple" / "config.yaml").write_text(config)
    server = await start_server(repository=example_repository)
    client = stub(server, channels)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(client, request())
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sample(server, "sluice_degraded_responses_total", model="simple", source="cache") == 0


async def test_the_response_cache_and_the_tier_together(
    start_server: StartServer, example_repository: Path, channels: list[grpc.aio.Channel]
) -> None:
    config = "response_cache: {enabled: true}\n" + DEGRADED
    (example_repository / "simple" / "config.yaml").write_text(config)
    server = await start_server(repository=example_repository)
    client = stub(server, channels)
    await infer(client, request())
    _, trailers = await infer(client, request())
    assert trailers["sluice-cache"] == "hit" and "sluice-degraded" not in trailers
    await reload_with(client, example_repository, config + FAILING)
    # A hit is a real answer (the same version computed it), not a degraded one.
    _, trailers = await infer(client, request())
    assert trailers["sluice-cache"] == "hit" and "sluice-degraded" not in trailers
    _, trailers = await infer(client, request(first=ONES * 2))
    assert trailers["sluice-degraded"] == "static"


async def test_bad_input_is_refused_not_degraded(
    start_server: StartServer, example_repository: Path, channels: list[grpc.aio.Channel]
) -> None:
    (example_repository / "simple" / "config.yaml").write_text(DEGRADED + FAILING)
    server = await start_server(repository=example_repository)
    client = stub(server, channels)
    bad = request()
    bad.inputs[1].datatype = "FP32"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await infer(client, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(server, "sluice_degraded_responses_total", model="simple", source="static") == 0


@pytest.mark.parametrize(
    ("static", "says"),
    [
        (STATIC.replace("OUTPUT1", "OUTPUT9"), "the model has no output 'OUTPUT9'"),
        (STATIC.split("    - {name: OUTPUT1")[0], "lacks the model's output(s) OUTPUT1"),
        (STATIC.replace("INT32", "FP32", 1), "FP32 but the model's output 'OUTPUT0' is INT32"),
        (
            STATIC.replace("shape: [1, 16]", "shape: [16, 1]", 1),
            "[16, 1] does not fit the model's output 'OUTPUT0' of shape [1, 16]",
        ),
        (STATIC.replace("data: [7,", "data: [", 1), "shape [1, 16] holds 16 elements"),
        (STATIC.replace("data: [7,", "data: [seven,", 1), "data is not INT32"),
    ],
)
async def test_a_static_answer_that_does_not_fit_is_a_load_error(
    start_server: StartServer, example_repository: Path, static: str, says: str
) -> None:
    (example_repository / "simple" / "config.yaml").write_text("degraded:\n" + static)
    server = await start_server(repository=example_repository)
    reasons = [row.reason for row in server.service.index() if row.name == "simple"]
    assert any(says in reason and "degraded.outputs" in reason for reason in reasons), reasons
    assert not server.service.is_ready("simple")


async def test_a_stream_gets_the_degraded_answer_too_with_every_breaker_open(
    start_server: StartServer, example_repository: Path, channels: list[grpc.aio.Channel]
) -> None:
    (example_repository / "simple" / "config.yaml").write_text(DEGRADED + FAILING)
    server = await start_server(repository=example_repository, breaker={"fail_max": 1})
    client = stub(server, channels)
    _, trailers = await infer(client, request())  # opens the breaker
    assert trailers["sluice-degraded"] == "static"

    async def two() -> AsyncIterator[pb.ModelInferRequest]:
        for value in (1, 2):
            yield request(first=ONES * value)

    answers = [answer async for answer in client.ModelStreamInfer(two())]
    assert [a.error_message for a in answers] == ["", ""]
    marks = [a.infer_response.parameters["sluice_degraded"].string_param for a in answers]
    assert marks == ["static", "static"]
    np.testing.assert_array_equal(output(answers[1].infer_response, 0), np.full((1, 16), 7))
    assert sample(server, "sluice_rejected_requests_total", reason="breaker") == 0
