"""The degraded tier of generation models over a real server, on copies of the example
``tiny_llama``: once every candidate failed before its first token or is open, Generate and
GenerateStream answer with the configured text, one chunk no token made, always marked
(trailing metadata, ``fallback_reason``, a metric, a span); with ``from_cache``, a greedy
request answered before is first replayed from the response cache, marked ``cache``;
``text`` and ``outputs`` each belong to one kind of model (a load error otherwise)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.tracing import Tracing
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import RunningServer, StartServer
from tests.test_generation_service import (
    PROMPT,
    collect,
    repository_with,
    request,
    stats,
    stream_request,
    text_of,
)

TEXT = "The story service is busy; please try again shortly."
FAILING = f"faults: {{mode: fail}}\ndegraded:\n  text: {TEXT!r}\n"


def sample(server: RunningServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def generate(
    stub: gen_grpc.GenerationServiceStub, message: gen.GenerateRequest
) -> tuple[list[gen.GenerateResponse], dict[str, str]]:
    call = stub.Generate(message)
    chunks = await collect(call)
    return chunks, dict(await call.trailing_metadata() or ())


def made(chunks: list[gen.GenerateResponse]) -> list[tuple[str, list[int]]]:
    return [(c.text, list(c.token_ids)) for c in chunks]


async def reload_with(channel: grpc.aio.Channel, repository: Path, model: str, config: str) -> None:
    (repository / model / "config.yaml").write_text(config)
    infer = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    await infer.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model))


async def test_a_failing_generation_model_answers_its_degraded_text_always_marked(
    start_server: StartServer, tmp_path: Path
) -> None:
    repository = repository_with(tmp_path, failing_llama={"config": FAILING})
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter)
    server = await start_server(repository=repository, breaker={"fail_max": 2}, tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        for _ in range(3):  # the breaker opens after two failures; the text answers either way
            call = stub.Generate(request(model="failing_llama", max_new_tokens=8))
            chunks = await collect(call)
            trailers = dict(await call.trailing_metadata() or ())
            assert [c.text for c in chunks] == [TEXT]
            assert list(chunks[0].token_ids) == []
            assert chunks[0].finish_reason == gen.FINISH_REASON_STOP
            assert chunks[0].usage.completion_tokens == 0
            assert chunks[0].model_name == "failing_llama" and chunks[0].model_version == "1"
            assert chunks[0].fallback_reason.startswith("degraded (static): ")
            assert trailers["sluice-degraded"] == "static"
        assert "circuit breaker is open" in chunks[0].fallback_reason
        breaker = {"model": "failing_llama", "version": "1", "backend": "causal_lm"}
        assert sample(server, "sluice_breaker_state", **breaker) == 2

        async def session() -> list[gen.GenerateStreamResponse]:
            start = gen.StartGeneration(
                request_id="a", request=request(model="failing_llama", max_new_tokens=4)
            )
            call = stub.GenerateStream(iter([gen.GenerateStreamRequest(start=start)]))
            return [response async for response in call]

        streamed = await session()
        assert [(r.request_id, r.chunk.text) for r in streamed] == [("a", TEXT)]
        assert streamed[0].chunk.fallback_reason.startswith("degraded (static): ")
        assert streamed[0].chunk.finish_reason == gen.FINISH_REASON_STOP

        decoupled = stream_request("d", stream=True)
        decoupled.model_name = "failing_llama"
        infer = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        replies = [r async for r in infer.ModelStreamInfer(iter([decoupled]))]
        assert [text_of(r) for r in replies] == [TEXT]
        assert replies[0].infer_response.parameters["sluice_degraded"].string_param == "static"

        # A healthy model with no degraded config is not touched.
        real = await collect(stub.Generate(request(max_new_tokens=4)))
        assert len(real) == 4 and all(not c.fallback_reason for c in real)

    labels = {"model": "failing_llama", "source": "static"}
    assert sample(server, "sluice_degraded_responses_total", **labels) == 5
    await tracing.flush()
    marked = [
        span.attributes["sluice.degraded"]
        for span in exporter.get_finished_spans()
        if span.name == "sluice.degraded" and span.attributes is not None
    ]
    assert marked == ["static"] * 5


KEPT = f"degraded:\n  from_cache: true\n  text: {TEXT!r}\n"


async def test_a_failing_generation_model_replays_its_kept_greedy_generation_then_its_text(
    start_server: StartServer, tmp_path: Path
) -> None:
    repository = repository_with(tmp_path, kept_llama={"config": KEPT})
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter)
    server = await start_server(repository=repository, breaker={"fail_max": 2}, tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        greedy = request(model="kept_llama", max_new_tokens=8)
        real, trailers = await generate(stub, greedy)
        assert len(real) == 8 and "sluice-degraded" not in trailers
        # from_cache alone keeps greedy generations but never serves them to normal traffic.
        prefills = stats(server, "kept_llama").prefills
        again, trailers = await generate(stub, greedy)
        assert "sluice-cache" not in trailers and "sluice-degraded" not in trailers
        assert stats(server, "kept_llama").prefills > prefills  # the model ran again
        assert made(again) == made(real)
        sampled = request(model="kept_llama", max_new_tokens=8, seed=3)
        sampled.parameters.temperature = 0.8
        await generate(stub, sampled)  # a sampled generation is never kept

        await reload_with(channel, repository, "kept_llama", "faults: {mode: fail}\n" + KEPT)
        for _ in range(3):  # the breaker opens after two failures; the cache answers either way
            replayed, trailers = await generate(stub, greedy)
            assert made(replayed) == made(real)
            assert trailers["sluice-degraded"] == "cache" and "sluice-cache" not in trailers
            assert all(c.fallback_reason.startswith("degraded (cache): ") for c in replayed)
            assert replayed[-1].finish_reason == real[-1].finish_reason
            assert replayed[-1].usage == real[-1].usage
            assert {c.model_name for c in replayed} == {"kept_llama"}
        assert "circuit breaker is open" in replayed[0].fallback_reason

        start = gen.StartGeneration(request_id="s", request=greedy)
        call = stub.GenerateStream(iter([gen.GenerateStreamRequest(start=start)]))
        streamed = [response.chunk async for response in call]
        assert made(streamed) == made(real)
        assert streamed[0].fallback_reason.startswith("degraded (cache): ")

        # Another prompt, or a sampled request, has nothing kept: the static text answers.
        other = request("Once upon a dog", model="kept_llama", max_new_tokens=8)
        for message in (other, sampled):
            chunks, trailers = await generate(stub, message)
            assert [c.text for c in chunks] == [TEXT]
            assert trailers["sluice-degraded"] == "static"
            assert chunks[0].fallback_reason.startswith("degraded (static): ")

    labels = {"model": "kept_llama"}
    assert sample(server, "sluice_degraded_responses_total", **labels, source="cache") == 4
    assert sample(server, "sluice_degraded_responses_total", **labels, source="static") == 2
    assert sample(server, "sluice_cache_hits_total", **labels) == 4
    await tracing.flush()
    marked = [
        span.attributes["sluice.degraded"]
        for span in exporter.get_finished_spans()
        if span.name == "sluice.degraded" and span.attributes is not None
    ]
    assert sorted(str(source) for source in marked) == ["cache"] * 4 + ["static"] * 2


async def test_from_cache_without_text_fails_what_was_never_kept(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = "degraded: {from_cache: true}\n"
    repository = repository_with(tmp_path, kept_llama={"config": config})
    server = await start_server(repository=repository)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        greedy = request(model="kept_llama", max_new_tokens=6)
        real, _ = await generate(stub, greedy)
        await reload_with(channel, repository, "kept_llama", "faults: {mode: fail}\n" + config)
        replayed, trailers = await generate(stub, greedy)
        assert made(replayed) == made(real) and trailers["sluice-degraded"] == "cache"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await generate(stub, request("Once upon a dog", model="kept_llama", max_new_tokens=6))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    labels = {"model": "kept_llama", "source": "cache"}
    assert sample(server, "sluice_degraded_responses_total", **labels) == 1


async def test_a_caller_error_is_refused_not_degraded(
    start_server: StartServer, tmp_path: Path
) -> None:
    repository = repository_with(tmp_path, failing_llama={"config": FAILING})
    server = await start_server(repository=repository)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub.Generate(request(PROMPT * 200, model="failing_llama")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    labels = {"model": "failing_llama", "source": "static"}
    assert sample(server, "sluice_degraded_responses_total", **labels) == 0


@pytest.mark.parametrize(
    ("model", "config", "says"),
    [
        (
            "tiny_copy",
            "degraded:\n  outputs:\n    - {name: text_output, datatype: BYTES, shape: [1], "
            "data: [busy]}\n",
            "field 'degraded.outputs': this is a generation model; give its static answer "
            "as 'degraded.text'",
        ),
        (
            "simple",
            "degraded:\n  text: busy\n",
            "field 'degraded.text': only a generation model answers with text",
        ),
    ],
)
async def test_degraded_text_and_outputs_each_belong_to_one_kind_of_model(
    start_server: StartServer,
    tmp_path: Path,
    model: str,
    config: str,
    says: str,
) -> None:
    repository = repository_with(tmp_path, tiny_copy={})
    (repository / model / "config.yaml").write_text(config)
    server = await start_server(repository=repository)
    reasons = [row.reason for row in server.service.index() if row.name == model]
    assert any(says in reason for reason in reasons), reasons
    assert not server.service.is_ready(model)
