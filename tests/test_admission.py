"""Admission weighs every call: requests, bytes and tokens in flight, server-wide and per
tenant; what does not fit now is shed with a pushback, what could never fit is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.admission import (
    BYTES_SHARE_OF_MEMORY,
    MIN_DEFAULT_INFLIGHT_BYTES,
    AdmissionController,
)
from sluice.errors import (
    DrainingError,
    InvalidInputError,
    OverloadedError,
    QuotaExceededError,
    RequestTooLargeError,
)
from sluice.metrics import Metrics
from sluice.settings import AdmissionSettings
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import StartServer
from tests.models import write_echo_repository

MiB = 1024 * 1024


def controller(**settings: object) -> tuple[AdmissionController, Metrics]:
    metrics = Metrics()
    return AdmissionController(AdmissionSettings.model_validate(settings), metrics), metrics


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_the_default_byte_budget_is_a_sixteenth_of_memory_and_shown_in_metrics() -> None:
    metrics = Metrics()
    big = AdmissionController(AdmissionSettings(), metrics, memory_bytes=32 * 1024 * MiB)
    assert big.limits.bytes == 32 * 1024 * MiB // BYTES_SHARE_OF_MEMORY
    assert gauge(metrics, "sluice_admission_limit", resource="bytes", scope="server") == (
        big.limits.bytes
    )
    small = AdmissionController(AdmissionSettings(), Metrics(), memory_bytes=256 * MiB)
    assert small.limits.bytes == MIN_DEFAULT_INFLIGHT_BYTES
    explicit, _ = controller(max_inflight_bytes=1234)
    assert explicit.limits.bytes == 1234


def test_bytes_are_held_until_release_and_growth_counts_the_largest_need() -> None:
    admission, metrics = controller(max_inflight_bytes=1000)
    ticket = admission.admit(request_bytes=100)
    ticket.need(work_bytes=300)
    ticket.need(work_bytes=200)  # a fallback's smaller reply adds nothing
    assert ticket.bytes == 400
    assert gauge(metrics, "sluice_inflight_bytes") == 400
    with pytest.raises(OverloadedError, match=r"400 of its 1000 bytes") as shed:
        admission.admit(request_bytes=700)
    assert shed.value.retry_after_ms is not None
    ticket.release()
    ticket.release()  # once only
    assert gauge(metrics, "sluice_inflight_bytes") == 0
    assert admission.inflight == 0
    admission.admit(request_bytes=700).release()


def test_a_call_larger_than_the_whole_budget_is_refused_for_good() -> None:
    admission, metrics = controller(max_inflight_bytes=1000, max_inflight_tokens=50)
    with pytest.raises(RequestTooLargeError, match=r"needs 1001 bytes .* whole budget of 1000"):
        admission.admit(request_bytes=1001)
    ticket = admission.admit(request_bytes=10)
    with pytest.raises(RequestTooLargeError, match=r"needs 51 tokens"):
        ticket.need(tokens=51)
    assert ticket.tokens == 0  # a refused need holds nothing more
    assert RequestTooLargeError("x").retry_after_ms is None
    assert gauge(metrics, "sluice_rejected_requests_total", reason="too_large") == 2


def test_tokens_that_do_not_fit_now_are_shed_with_pushback() -> None:
    admission, metrics = controller(max_inflight_tokens=100)
    first = admission.admit()
    first.need(tokens=60)
    second = admission.admit()
    with pytest.raises(OverloadedError, match=r"60 of its 100 tokens"):
        second.need(tokens=60)
    assert gauge(metrics, "sluice_inflight_tokens") == 60
    first.release()
    second.need(tokens=60)
    assert gauge(metrics, "sluice_inflight_tokens") == 60
    assert gauge(metrics, "sluice_rejected_requests_total", reason="tokens") == 1


def test_tenant_budgets_are_quotas_with_their_own_status() -> None:
    admission, _ = controller(
        tenant_max_inflight_requests=2, tenant_max_inflight_bytes=500, tenant_max_inflight_tokens=40
    )
    held = admission.admit("acme", request_bytes=400)
    with pytest.raises(QuotaExceededError, match=r"tenant 'acme' has 400 of its 500 bytes"):
        admission.admit("acme", request_bytes=200)
    other = admission.admit("globex", request_bytes=400)  # another tenant is not affected
    with pytest.raises(RequestTooLargeError, match=r"tenant 'acme''s whole budget of 40"):
        held.need(tokens=41)
    held.need(tokens=40)
    second = admission.admit("acme")
    with pytest.raises(QuotaExceededError, match=r"2 calls in flight"):
        admission.admit("acme")
    for ticket in (held, other, second):
        ticket.release()
    admission.admit("acme", request_bytes=500).release()


def test_a_tenant_id_is_bounded() -> None:
    admission, _ = controller()
    with pytest.raises(InvalidInputError, match=r"at most 128"):
        admission.admit("t" * 129)


async def test_the_drain_cuts_calls_still_running_when_its_grace_ends() -> None:
    admission, metrics = controller()
    started = asyncio.Event()

    async def call() -> None:
        async with admission.cutoff():
            started.set()
            await asyncio.Event().wait()  # a call that never finishes by itself

    running = asyncio.create_task(call())
    await started.wait()
    admission.begin_drain(asyncio.get_running_loop().time())
    with pytest.raises(DrainingError, match=r"drain grace ended"):
        await running
    assert gauge(metrics, "sluice_rejected_requests_total", reason="drain_grace") == 1
    with pytest.raises(DrainingError):
        admission.admit()


# -- over the wire -------------------------------------------------------------------------


def generate_request(max_new_tokens: int = 8) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model_name="tiny_llama",
        prompt="Once upon a time",
        parameters=gen.SamplingParameters(max_new_tokens=max_new_tokens),
    )


async def test_generate_and_count_tokens_are_admitted_per_call_and_per_tenant(
    start_server: StartServer,
) -> None:
    running = await start_server(
        admission={"max_inflight_requests": 1, "tenant_max_inflight_requests": 1}
    )
    metrics = running.metrics
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        holder = stub.Generate(generate_request(64), metadata=(("x-sluice-tenant", "a"),))
        first = await holder.read()  # the first call runs (and holds its admission)
        assert first.text or first.token_ids
        assert gauge(metrics, "sluice_inflight_requests") == 1
        outcomes = await asyncio.gather(
            *(
                _first_status(stub.Generate(generate_request(), metadata=(("x-sluice-tenant", t),)))
                for t in "aaaabbbb"
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as counted:
            await stub.CountTokens(gen.CountTokensRequest(model_name="tiny_llama", prompt="hi"))
        holder.cancel()
    assert set(outcomes) == {grpc.StatusCode.UNAVAILABLE}
    assert counted.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("grpc-retry-pushback-ms", "50") in tuple(counted.value.trailing_metadata() or ())


async def _first_status(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_generation_tokens_are_weighed_server_wide(start_server: StartServer) -> None:
    running = await start_server(admission={"max_inflight_tokens": 40})
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as too_large:
            async for _ in stub.Generate(generate_request(max_new_tokens=64)):
                pass
        holder = stub.Generate(generate_request(max_new_tokens=30))
        await holder.read()
        assert gauge(running.metrics, "sluice_inflight_tokens") > 30
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            async for _ in stub.Generate(generate_request(max_new_tokens=30)):
                pass
        holder.cancel()
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "whole budget of 40" in str(too_large.value.details())
    assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tokens in flight" in str(shed.value.details())


WIDTH = MiB // 4  # one row of the echo model: 1 MiB of FP32


def echo(rows: int) -> pb.ModelInferRequest:
    data = np.zeros((rows, WIDTH), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="echo",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[rows, WIDTH])
        ],
        raw_input_contents=[data.tobytes()],
    )


async def test_request_and_reply_bytes_are_weighed_before_the_model_runs(
    start_server: StartServer, tmp_path: Path
) -> None:
    repository = write_echo_repository(tmp_path / "models", dims=(WIDTH,))
    running = await start_server(repository=repository, admission={"max_inflight_bytes": 3 * MiB})
    model = running.service.lookup("echo")
    runs = model.stats.execution_count
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        await stub.ModelInfer(echo(1))  # 1 MiB in, 1 MiB out (known from its shape): fits
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(echo(2))  # 2 MiB in and 2 out: never
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "whole budget of 3145728" in str(refused.value.details())
    assert model.stats.execution_count == runs + 1  # the refused call never ran
    assert gauge(running.metrics, "sluice_inflight_bytes") == 0
