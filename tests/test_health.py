"""grpc.health.v1: NOT_SERVING until models load, one service name per model, Watch."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.app import EXAMPLE_REPOSITORY
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.settings import Settings
from sluice.transport.server import create_server
from tests.conftest import RunningServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_not_serving_until_models_load() -> None:
    settings = Settings(grpc_port=0, metrics_port=None)
    metrics = Metrics()
    service = ModelRegistry(settings, repository=EXAMPLE_REPOSITORY, metrics=metrics)
    server = await create_server(settings, service, metrics=metrics, clock=time.monotonic)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert await check(stub) == NOT_SERVING
            assert await check(stub, "inference.GRPCInferenceService") == NOT_SERVING
            await service.load_all()
            await server.mark_started()
            assert await check(stub) == SERVING
            assert await check(stub, "inference.GRPCInferenceService") == SERVING
    finally:
        await server.drain(0)


async def test_each_model_has_a_health_service(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for model in ("simple", "mlp", "passthrough"):
            assert await check(stub, f"sluice.model.{model}") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(stub, "sluice.model.nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_streams_model_changes(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="sluice.model.simple"))
        assert (await watch.read()).status == SERVING
        await server.service.unload("simple")
        assert (await watch.read()).status == NOT_SERVING
        await server.service.load("simple")
        assert (await watch.read()).status == SERVING
        watch.cancel()
