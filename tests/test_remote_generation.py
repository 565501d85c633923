"""Remote generation fallbacks: a generation model whose primary fails before its first
token falls back to a second, real Sluice server's ``sluice.v1.GenerationService``, both
servers on 127.0.0.1 port 0, the example ``tiny_llama`` on the remote."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.tracing import Tracing
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import StartServer
from tests.test_generation_service import collect, repository_with, request
from tests.test_routing import sample

GENERATE_SPAN = "sluice.v1.GenerationService/Generate"


def falling_back(tmp_path: Path, remote: str, model: str = "tiny_llama") -> Path:
    """``failing_llama`` here always fails; its fallback is ``model`` at ``remote``."""
    config = f"faults: {{mode: fail}}\nfallbacks: [{{endpoint: '{remote}', model: {model}}}]\n"
    return repository_with(tmp_path / "local", failing_llama={"config": config})


async def test_a_failing_generation_falls_back_to_a_remote_sluice_token_for_token(
    start_server: StartServer, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    remote_tracing = Tracing.with_exporter(exporter)
    remote = await start_server(
        repository=repository_with(tmp_path / "remote"), tracing=remote_tracing
    )
    local_exporter = InMemorySpanExporter()
    local_tracing = Tracing.with_exporter(local_exporter)
    local = await start_server(
        repository=falling_back(tmp_path, remote.address), tracing=local_tracing
    )
    asked = request(model="failing_llama", max_new_tokens=12)
    async with (
        grpc.aio.insecure_channel(local.address) as here,
        grpc.aio.insecure_channel(remote.address) as there,
    ):
        direct = await collect(
            gen_grpc.GenerationServiceStub(there).Generate(request(max_new_tokens=12))
        )
        call = gen_grpc.GenerationServiceStub(here).Generate(
            asked, metadata=(("x-request-id", "far-gen"),)
        )
        relayed = await collect(call)
        trailers = dict(await call.trailing_metadata() or ())

        start = gen.StartGeneration(request_id="s", request=asked)
        session = gen_grpc.GenerationServiceStub(here).GenerateStream(
            iter([gen.GenerateStreamRequest(start=start)])
        )
        streamed = [response.chunk async for response in session]

    tokens = [list(c.token_ids) for c in direct]
    assert [list(c.token_ids) for c in relayed] == tokens
    assert [list(c.token_ids) for c in streamed] == tokens
    assert "".join(c.text for c in relayed) == "".join(c.text for c in direct)
    assert relayed[-1].finish_reason == direct[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert relayed[-1].usage.completion_tokens == 12
    assert relayed[-1].usage.prompt_tokens == direct[-1].usage.prompt_tokens
    assert {c.model_name for c in relayed} == {"tiny_llama"}
    assert trailers["x-sluice-endpoint"] == remote.address
    why = relayed[0].fallback_reason
    assert "failing_llama' failed before its first token" in why
    assert why.endswith(f"served by {remote.address}/tiny_llama")
    assert streamed[0].fallback_reason == why

    labels = {"endpoint": remote.address, "model": "tiny_llama", "code": "OK"}
    assert sample(local, "sluice_remote_requests_total", labels) == 2
    assert sample(local, "sluice_remote_inflight_requests", {"endpoint": remote.address}) == 0
    assert await remote_tracing.flush() and await local_tracing.flush()
    served = {
        span.attributes.get("sluice.request_id"): span
        for span in exporter.get_finished_spans()
        if span.name == GENERATE_SPAN and span.attributes
    }
    assert "far-gen" in served  # the caller's request id went along, and its trace:
    outbound = [s for s in local_exporter.get_finished_spans() if s.name == "sluice.remote"]
    by_id = {s.context.span_id: s for s in outbound if s.context is not None}
    parent = served["far-gen"].parent
    assert parent is not None and parent.span_id in by_id
    await remote_tracing.shutdown()
    await local_tracing.shutdown()


async def test_a_remote_failing_after_its_first_token_ends_the_stream_with_unavailable(
    start_server: StartServer, tmp_path: Path
) -> None:
    flaky = {"config": "faults: {mode: fail, after_tokens: 3}\n"}
    remote = await start_server(repository=repository_with(tmp_path / "remote", flaky=flaky))
    local = await start_server(repository=falling_back(tmp_path, remote.address, "flaky"))
    received: list[gen.GenerateResponse] = []
    async with grpc.aio.insecure_channel(local.address) as here:
        call = gen_grpc.GenerationServiceStub(here).Generate(
            request(model="failing_llama", max_new_tokens=12)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for chunk in call:
                received.append(chunk)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{remote.address}/flaky failed during the generation" in str(failed.value.details())
    assert 1 <= len(received) <= 3  # the tokens sent stand
    assert sample(local, "sluice_remote_inflight_requests", {"endpoint": remote.address}) == 0


async def test_a_remote_generation_fallback_that_is_down_opens_its_breaker(
    start_server: StartServer, tmp_path: Path
) -> None:
    remote = await start_server(repository=repository_with(tmp_path / "remote"))
    local = await start_server(
        repository=falling_back(tmp_path, remote.address),
        breaker={"fail_max": 2, "reset_timeout_s": 600},
    )
    await remote.server.grpc_server.stop(0)  # the remote is gone
    codes = []
    async with grpc.aio.insecure_channel(local.address) as here:
        stub = gen_grpc.GenerationServiceStub(here)
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await collect(stub.Generate(request(model="failing_llama", max_new_tokens=4)))
            codes.append(failed.value.code())
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    details = failed.value.details() or ""
    assert f"{remote.address}/tiny_llama" in details and "breaker is open" in details
    breaker = {"model": f"{remote.address}/tiny_llama", "version": "", "backend": "remote"}
    assert sample(local, "sluice_breaker_state", breaker) == 2  # open
    labels = {"endpoint": remote.address, "model": "tiny_llama", "code": "UNAVAILABLE"}
    assert sample(local, "sluice_remote_requests_total", labels) == 2  # none once open


async def test_a_remote_silent_before_its_first_token_gets_only_its_share_of_the_deadline(
    start_server: StartServer, tmp_path: Path
) -> None:
    hanging = {"config": "faults: {mode: hang}\n"}
    remote = await start_server(repository=repository_with(tmp_path / "remote", hanging=hanging))
    config = (
        "faults: {mode: fail}\n"
        f"fallbacks: [{{endpoint: '{remote.address}', model: hanging}}, {{model: tiny_llama}}]\n"
    )
    local = await start_server(
        repository=repository_with(tmp_path / "local", failing_llama={"config": config})
    )
    async with grpc.aio.insecure_channel(local.address) as here:
        call = gen_grpc.GenerationServiceStub(here).Generate(
            request(model="failing_llama", max_new_tokens=4), timeout=2.0
        )
        chunks = await collect(call)  # a DEADLINE_EXCEEDED would fail the test
        trailers = dict(await call.trailing_metadata() or ())
    assert {c.model_name for c in chunks} == {"tiny_llama"}
    assert "x-sluice-endpoint" not in trailers
    why = chunks[0].fallback_reason
    assert "failing_llama' failed before its first token" in why
    labels = {"endpoint": remote.address, "model": "hanging", "code": "DEADLINE_EXCEEDED"}
    assert sample(local, "sluice_remote_requests_total", labels) == 1
    assert sample(local, "sluice_remote_inflight_requests", {"endpoint": remote.address}) == 0
