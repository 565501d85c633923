"""Batching, deadlines, admission and breakers over a real server, with a fake backend
whose timing the tests control and an injected clock (no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import FakeClock, RunningServer, StartServer
from tests.fakes import POISON, Behaviour, fake_backends, fake_repository

BATCHING = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 0\n"


def request(rows: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="fake",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=rows.shape)],
        raw_input_contents=[rows.astype(np.float32).tobytes()],
    )


def rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 4), value, dtype=np.float32)


def output(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 4)


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour, clock: FakeClock
) -> RunningServer:
    return await start_server(
        repository=fake_repository(tmp_path, BATCHING),
        backends=fake_backends(behaviour),
        clock=clock,
        breaker={"fail_max": 3, "reset_timeout_s": 10.0},
    )


@pytest.fixture
async def stub(fake_server: RunningServer) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(fake_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def occupy(
    stub: pb_grpc.GRPCInferenceServiceStub, behaviour: Behaviour
) -> asyncio.Future[pb.ModelInferResponse]:
    """Start one call and wait until the backend holds it (the only instance is busy)."""
    behaviour.hold()
    task = asyncio.ensure_future(stub.ModelInfer(request(rows(1.0))))
    await behaviour.started.wait()
    return task


async def wait_queued(server: RunningServer, depth: int) -> None:
    model = server.service.get("fake")
    while model.batcher.queue_depth < depth:
        await asyncio.sleep(0)


async def test_queued_requests_run_as_one_batch(
    stub: pb_grpc.GRPCInferenceServiceStub, fake_server: RunningServer, behaviour: Behaviour
) -> None:
    first = await occupy(stub, behaviour)
    calls = [
        asyncio.ensure_future(stub.ModelInfer(request(rows(float(i), 1 + i % 2)))) for i in range(5)
    ]
    await wait_queued(fake_server, 5)
    behaviour.release()
    responses = await asyncio.gather(first, *calls)
    assert behaviour.batches == [1, 1 + 2 + 1 + 2 + 1]
    for i, response in enumerate(responses[1:]):
        np.testing.assert_array_equal(output(response), rows(2.0 * i, 1 + i % 2))
    stats = fake_server.service.statistics("fake")[0][2]
    assert (stats.inference_count, stats.execution_count) == (8, 2)


async def test_bad_row_in_a_batch_fails_alone(
    stub: pb_grpc.GRPCInferenceServiceStub, fake_server: RunningServer, behaviour: Behaviour
) -> None:
    first = await occupy(stub, behaviour)
    good = [asyncio.ensure_future(stub.ModelInfer(request(rows(3.0)))) for _ in range(3)]
    bad = asyncio.ensure_future(stub.ModelInfer(request(rows(POISON))))
    await wait_queued(fake_server, 4)
    behaviour.release()
    await first
    for call in good:
        np.testing.assert_array_equal(output(await call), rows(6.0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bad
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "poison" in (info.value.details() or "")


async def test_request_expiring_in_queue_never_runs(
    stub: pb_grpc.GRPCInferenceServiceStub,
    fake_server: RunningServer,
    behaviour: Behaviour,
    clock: FakeClock,
) -> None:
    first = await occupy(stub, behaviour)
    late = asyncio.ensure_future(stub.ModelInfer(request(rows(5.0)), timeout=60))
    await wait_queued(fake_server, 1)
    clock.advance(61)  # the queued request's budget is spent on the service clock
    behaviour.release()
    await first
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await late
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "queue" in (info.value.details() or "")
    assert behaviour.calls == 1
    assert fake_server.service.statistics("fake")[0][2].dropped == 1
    dropped = fake_server.metrics.registry.get_sample_value(
        "sluice_dropped_requests_total", {"model": "fake", "version": "1", "reason": "deadline"}
    )
    assert dropped == 1


async def test_cancelled_request_is_dropped_before_execution(
    stub: pb_grpc.GRPCInferenceServiceStub, fake_server: RunningServer, behaviour: Behaviour
) -> None:
    first = await occupy(stub, behaviour)
    gone = stub.ModelInfer(request(rows(5.0)))
    waiter = asyncio.ensure_future(gone)
    await wait_queued(fake_server, 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    model = fake_server.service.get("fake")
    registry = fake_server.metrics.registry
    cancelled = {"method": "ModelInfer", "model": "fake", "code": "CANCELLED"}
    while registry.get_sample_value("sluice_requests_total", cancelled) is None:
        await asyncio.sleep(0.01)  # the server learns of the cancel asynchronously
    behaviour.release()
    await first
    assert behaviour.calls == 1
    assert model.stats.dropped == 1


async def test_breaker_opens_fails_fast_and_closes_after_trial(
    stub: pb_grpc.GRPCInferenceServiceStub,
    fake_server: RunningServer,
    behaviour: Behaviour,
    clock: FakeClock,
) -> None:
    behaviour.fail = True
    for _ in range(3):  # fail_max
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(1.0)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert behaviour.calls == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request(rows(1.0)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "breaker" in (info.value.details() or "")
    assert behaviour.calls == 3  # failed fast: the backend was not called
    state = {"model": "fake", "version": "1", "backend": "fake"}
    assert fake_server.metrics.registry.get_sample_value("sluice_breaker_state", state) == 2

    behaviour.fail = False
    clock.advance(10.0)  # reset_timeout_s: the next call is a half-open trial
    np.testing.assert_array_equal(output(await stub.ModelInfer(request(rows(1.0)))), rows(2.0))
    assert behaviour.calls == 4
    assert fake_server.metrics.registry.get_sample_value("sluice_breaker_state", state) == 0


async def test_bad_input_never_trips_the_breaker(
    stub: pb_grpc.GRPCInferenceServiceStub, behaviour: Behaviour
) -> None:
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(POISON)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(output(await stub.ModelInfer(request(rows(1.0)))), rows(2.0))


def pushback(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")


async def test_inflight_limit_sheds_with_pushback_and_loses_nothing(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    server = await start_server(
        repository=fake_repository(tmp_path, BATCHING),
        backends=fake_backends(behaviour),
        admission={"max_inflight_requests": 3, "pushback_ms": 120},
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        admitted = [await occupy(stub, behaviour)]
        admitted += [
            asyncio.ensure_future(stub.ModelInfer(request(rows(float(i))))) for i in (2, 3)
        ]
        await wait_queued(server, 2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(9.0)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert pushback(info.value) == "120"
        behaviour.release()
        results = [output(r) for r in await asyncio.gather(*admitted)]
    for value, result in zip((1.0, 2.0, 3.0), results, strict=True):
        np.testing.assert_array_equal(result, rows(2 * value))
    rejected = server.metrics.registry.get_sample_value(
        "sluice_rejected_requests_total", {"reason": "overload"}
    )
    assert rejected == 1


async def test_full_queue_sheds_with_pushback(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    config = BATCHING + "  max_queue_size: 1\n"
    server = await start_server(
        repository=fake_repository(tmp_path, config),
        backends=fake_backends(behaviour),
        admission={"pushback_ms": 75},
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = await occupy(stub, behaviour)
        queued = asyncio.ensure_future(stub.ModelInfer(request(rows(2.0))))
        await wait_queued(server, 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(3.0)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert pushback(info.value) == "75"
        behaviour.release()
        await first
        np.testing.assert_array_equal(output(await queued), rows(4.0))


async def test_tenant_quota_is_resource_exhausted_with_details(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    server = await start_server(
        repository=fake_repository(tmp_path, BATCHING),
        backends=fake_backends(behaviour),
        admission={"tenant_max_inflight_requests": 1},
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        behaviour.hold()
        team_a = (("x-sluice-tenant", "team-a"),)
        held = asyncio.ensure_future(stub.ModelInfer(request(rows(1.0)), metadata=team_a))
        await behaviour.started.wait()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(1.0)), metadata=team_a)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(info.value.trailing_metadata() or ())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(details)
        quota = error_details_pb2.QuotaFailure()
        assert any(d.Unpack(quota) for d in status.details)
        assert quota.violations[0].subject == "tenant:team-a"
        other = asyncio.ensure_future(
            stub.ModelInfer(request(rows(2.0)), metadata=(("x-sluice-tenant", "team-b"),))
        )
        await wait_queued(server, 1)
        behaviour.release()
        await held
        np.testing.assert_array_equal(output(await other), rows(4.0))


async def test_open_breaker_survives_a_restart(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour, clock: FakeClock
) -> None:
    repository = fake_repository(tmp_path / "models", BATCHING)
    breaker = {"fail_max": 3, "reset_timeout_s": 10.0, "state_file": tmp_path / "breakers.json"}
    first = await start_server(
        repository=repository, backends=fake_backends(behaviour), clock=clock, breaker=breaker
    )
    behaviour.fail = True
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(request(rows(1.0)))
    await first.server.drain(0)

    behaviour.fail = False  # healthy again, but the new process does not know that yet
    second = await start_server(
        repository=repository, backends=fake_backends(behaviour), clock=clock, breaker=breaker
    )
    state = {"model": "fake", "version": "1", "backend": "fake"}
    assert second.metrics.registry.get_sample_value("sluice_breaker_state", state) == 2
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(rows(1.0)))
        assert "breaker" in (info.value.details() or "")
        assert behaviour.calls == 3  # the restart did not hammer the broken backend
        clock.advance(10.0)
        np.testing.assert_array_equal(output(await stub.ModelInfer(request(rows(1.0)))), rows(2.0))


async def test_model_health_follows_its_breaker(
    fake_server: RunningServer, behaviour: Behaviour, clock: FakeClock
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(fake_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="sluice.model.fake"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        behaviour.fail = True
        for _ in range(3):  # fail_max: the breaker opens
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(request(rows(1.0)))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        behaviour.fail = False
        clock.advance(10.0)  # half-open: the next call is the trial, and it passes
        await stub.ModelInfer(request(rows(1.0)))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
