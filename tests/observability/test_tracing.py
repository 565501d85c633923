"""Spans over the wire: a real server, real calls, and a real OTLP collector that receives
what the SDK's exporter sends (parent-child links, links, attributes, statuses)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from sluice.settings import TracingSettings
from sluice.tracing import Tracing, record_decode_summary
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import RunningServer, StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository
from tests.observability.collector import Collector, Received
from tests.observability.conftest import MakeTracing
from tests.test_routing import simple_request, with_backup

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
INFER = "inference.GRPCInferenceService/ModelInfer"


def fake_request(value: float) -> pb.ModelInferRequest:
    x = np.full((1, 4), value, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="fake",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )


def children(spans: list[Received], parent: Received, name: str) -> list[Received]:
    return [
        s
        for s in spans
        if s.name == name and s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
    ]


async def infer_and_collect(
    server: RunningServer, tracing: Tracing, collector: Collector, request: pb.ModelInferRequest
) -> tuple[str, list[Received]]:
    """One traced ModelInfer under our traceparent; returns its request id and the spans."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        )
        await call
        trailers = dict(await call.trailing_metadata() or ())
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: any(s.name == "sluice.batch" for s in got))
    return str(trailers["x-request-id"]), spans


async def test_a_call_is_one_span_tree_under_the_callers_traceparent(
    start_server: StartServer, tracing: Tracing, collector: Collector
) -> None:
    server = await start_server(tracing=tracing)
    request_id, spans = await infer_and_collect(
        server, tracing, collector, simple_request("simple")
    )

    (root,) = [s for s in spans if s.name == INFER]
    assert (root.trace_id, root.parent_span_id, root.kind) == (TRACE_ID, PARENT_ID, SERVER)
    assert root.service_name == "sluice-test"
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.method"] == "ModelInfer"
    assert root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["sluice.request_id"] == request_id
    assert root.attributes["sluice.model"] == "simple"

    assert len(children(spans, root, "sluice.admission")) == 1
    (attempt,) = children(spans, root, "sluice.attempt")
    assert attempt.attributes == {
        "sluice.attempt": 1,
        "sluice.model": "simple",
        "sluice.fallback": False,
        "sluice.model.version": "1",
        "sluice.backend": "onnxruntime",
        "sluice.breaker.state": "closed",
    }
    (queued,) = children(spans, attempt, "sluice.queue_wait")
    assert attempt.start_ns <= queued.start_ns <= queued.end_ns <= attempt.end_ns

    (batch,) = [s for s in spans if s.name == "sluice.batch"]
    assert batch.links == [(TRACE_ID, attempt.span_id)]
    assert batch.parent_span_id == ""  # its own trace, linked to the requests it ran
    assert batch.attributes["sluice.batch.size"] == 1
    assert batch.attributes["sluice.backend"] == "onnxruntime"
    assert queued.end_ns <= batch.start_ns + 1_000_000  # the wait ends as the batch starts


async def test_a_batch_span_links_every_request_span_in_it(
    start_server: StartServer, tracing: Tracing, collector: Collector, tmp_path: Path
) -> None:
    behaviour = Behaviour()
    server = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(behaviour),
        tracing=tracing,
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        behaviour.hold()
        first = asyncio.ensure_future(stub.ModelInfer(fake_request(0)))
        await behaviour.started.wait()
        queued = [asyncio.ensure_future(stub.ModelInfer(fake_request(i))) for i in range(1, 5)]
        batcher = server.service.get("fake").batcher
        while batcher.queue_depth < 4:
            await asyncio.sleep(0)
        behaviour.release()
        await asyncio.gather(first, *queued)
    assert behaviour.batches == [1, 4]
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: len([s for s in got if s.name == INFER]) == 5)

    attempts = {s.span_id: s for s in spans if s.name == "sluice.attempt"}
    (big,) = [
        s for s in spans if s.name == "sluice.batch" and s.attributes["sluice.batch.size"] == 4
    ]
    assert big.attributes["sluice.batch.requests"] == 4
    assert len(big.links) == 4
    assert len({trace for trace, _ in big.links}) == 4  # four calls, four traces
    for trace_id, span_id in big.links:
        assert attempts[span_id].trace_id == trace_id


async def test_health_and_reflection_calls_are_not_traced(
    start_server: StartServer, tracing: Tracing, collector: Collector
) -> None:
    server = await start_server(tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for _ in reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            pass
        await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: len(got) > 0)
    assert [s.name for s in spans] == ["inference.GRPCInferenceService/ServerLive"]


async def test_failed_attempts_and_the_fallback_hop_are_spans(
    start_server: StartServer, tracing: Tracing, collector: Collector, example_repository: Path
) -> None:
    repository = with_backup(
        example_repository, "faults: {mode: fail}\nfallbacks: [{model: simple_b}]\n"
    )
    server = await start_server(
        repository=repository, tracing=tracing, retry={"initial_backoff_ms": 0}
    )
    _, spans = await infer_and_collect(server, tracing, collector, simple_request("simple"))

    (root,) = [s for s in spans if s.name == INFER]
    assert root.attributes["rpc.grpc.status_code"] == 0
    first, second = sorted(children(spans, root, "sluice.attempt"), key=lambda s: s.start_ns)
    assert first.status_code == ERROR
    assert first.attributes["sluice.model"] == "simple"
    assert first.attributes["error.type"] == "ExecutorError"
    assert first.attributes["sluice.error_class"] == "transient"
    assert second.status_code != ERROR
    assert second.attributes["sluice.model"] == "simple_b"
    assert second.attributes["sluice.fallback"] is True
    (hop,) = children(spans, root, "sluice.fallback")
    assert hop.attributes["sluice.from"] == "simple"
    assert hop.attributes["sluice.to"] == "simple_b"
    assert first.end_ns <= hop.start_ns and hop.end_ns <= second.start_ns


async def test_every_request_of_a_stream_is_traced_under_the_stream_span(
    start_server: StartServer, tracing: Tracing, collector: Collector
) -> None:
    server = await start_server(tracing=tracing)
    requests = [simple_request("simple") for _ in range(3)]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = [r async for r in stub.ModelStreamInfer(iter(requests))]
    assert [r.error_message for r in responses] == ["", "", ""]
    assert await tracing.flush()
    spans = await collector.wait_for(
        lambda got: any(s.name.endswith("/ModelStreamInfer") for s in got)
    )
    (stream,) = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelStreamInfer"]
    assert stream.attributes["rpc.grpc.status_code"] == 0
    assert len(children(spans, stream, "sluice.attempt")) == 3


async def test_a_failed_call_has_an_error_status_and_its_grpc_code(
    start_server: StartServer, tracing: Tracing, collector: Collector
) -> None:
    server = await start_server(tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(simple_request("nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: any(s.name == INFER for s in got))
    (root,) = [s for s in spans if s.name == INFER]
    assert root.status_code == ERROR
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_unreachable_collector_never_breaks_serving(
    start_server: StartServer, make_tracing: MakeTracing
) -> None:
    tracing = make_tracing(f"http://127.0.0.1:{closed_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    assert tracing.enabled
    server = await start_server(tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            response = await stub.ModelInfer(simple_request("simple"), timeout=10)
            assert response.model_name == "simple"
    async with asyncio.timeout(15):  # flush_timeout_s (5) bounds it, with room for a slow host
        await tracing.shutdown()
    assert not tracing.enabled


async def test_a_collector_that_refuses_spans_never_breaks_serving(
    start_server: StartServer, make_tracing: MakeTracing
) -> None:
    refusing = await Collector(fail_with=grpc.StatusCode.INTERNAL).start()
    try:
        tracing = make_tracing(refusing.endpoint)
        server = await start_server(tracing=tracing)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(5):
                await stub.ModelInfer(simple_request("simple"), timeout=10)
        await tracing.flush()
        assert refusing.requests >= 1 and refusing.spans == []
        await tracing.shutdown()
    finally:
        await refusing.stop()


def test_a_broken_exporter_setting_leaves_tracing_off(otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    otel_env.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "no-such-compression")
    assert not Tracing.from_environment(TracingSettings()).enabled


def test_tracing_is_off_unless_configured(otel_env: pytest.MonkeyPatch) -> None:
    assert not Tracing.from_environment(TracingSettings()).enabled
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert not Tracing.from_environment(TracingSettings(enabled=False)).enabled
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not Tracing.from_environment(TracingSettings(enabled=True)).enabled


async def test_the_sampler_comes_from_the_environment(
    start_server: StartServer, make_tracing: MakeTracing, collector: Collector
) -> None:
    tracing = make_tracing(collector.endpoint, OTEL_TRACES_SAMPLER="always_off")
    server = await start_server(tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(simple_request("simple"))
    assert await tracing.flush()
    assert collector.spans == []


async def test_generation_spans_for_prefill_and_a_decode_summary(
    tracing: Tracing, collector: Collector
) -> None:
    with tracing.span("call") as call:
        with tracing.prefill_span(model="tiny", version="1", prompt_tokens=7):
            pass
        parent = tracing.capture()

    async def elsewhere() -> None:  # a scheduler task, outside the call's context
        with tracing.decode_span(model="tiny", version="1", parent=parent) as span:
            record_decode_summary(span, tokens=12, steps=11, finish_reason="length")

    await asyncio.create_task(elsewhere(), context=None)
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: len(got) == 3)
    by_name = {s.name: s for s in spans}
    call_id = format(call.get_span_context().span_id, "016x")
    assert by_name["sluice.prefill"].parent_span_id == call_id
    assert by_name["sluice.prefill"].attributes["sluice.prompt_tokens"] == 7
    decode = by_name["sluice.decode"]
    assert decode.parent_span_id == call_id
    assert decode.attributes["sluice.decode.tokens"] == 12
    assert decode.attributes["sluice.decode.steps"] == 11
    assert decode.attributes["sluice.finish_reason"] == "length"


def test_off_helpers_record_nothing() -> None:
    tracing = Tracing.off()
    with tracing.span("x") as span, tracing.decode_span(model="m", version="1") as decode:
        record_decode_summary(decode, tokens=1, steps=1)
        assert not span.is_recording()
    assert tracing.capture() is None


async def test_a_generation_has_prefill_and_decode_spans_under_its_call(
    start_server: StartServer, tracing: Tracing, collector: Collector
) -> None:
    server = await start_server(tracing=tracing)
    request = gen.GenerateRequest(
        model_name="tiny_llama",
        prompt="Once upon a time",
        parameters=gen.SamplingParameters(max_new_tokens=9),
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = gen_grpc.GenerationServiceStub(channel).Generate(
            request, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        )
        chunks = [chunk async for chunk in call]
    assert len(chunks) == 9
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: any(s.name == "sluice.decode" for s in got))
    (root,) = [s for s in spans if s.name == "sluice.v1.GenerationService/Generate"]
    assert root.trace_id == TRACE_ID
    (prefill,) = children(spans, root, "sluice.prefill")
    assert prefill.attributes["sluice.prompt_tokens"] == 4
    assert prefill.attributes["sluice.model"] == "tiny_llama"
    (decode,) = children(spans, root, "sluice.decode")
    assert decode.attributes["sluice.decode.tokens"] == 9
    assert decode.attributes["sluice.decode.steps"] == 8
    assert decode.attributes["sluice.finish_reason"] == "length"
