"""grpc.health.v1: NOT_SERVING until models load, one service name per model, Watch."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.app import EXAMPLE_REPOSITORY
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.settings import Settings
from sluice.transport.server import create_server
from sluice_client.names import LIVENESS_SERVICE
from tests.certs import Certificates
from tests.conftest import RunningServer, StartServer

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


async def test_liveness_is_serving_before_models_load_and_while_draining() -> None:
    settings = Settings(grpc_port=0, metrics_port=None)
    metrics = Metrics()
    service = ModelRegistry(settings, repository=EXAMPLE_REPOSITORY, metrics=metrics)
    server = await create_server(settings, service, metrics=metrics, clock=time.monotonic)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await check(stub) == NOT_SERVING
        assert await check(stub, LIVENESS_SERVICE) == SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
        assert (await watch.read()).status == SERVING
        await service.load_all()
        await server.mark_started()
        await server.health.enter_graceful_shutdown()  # the drain's first step
        assert await check(stub) == NOT_SERVING
        assert await check(stub, "sluice.model.simple") == NOT_SERVING
        assert await check(stub, LIVENESS_SERVICE) == SERVING
        await server.drain(0)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await watch.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_health_port_answers_in_plaintext_beside_a_tls_grpc_port(
    start_server: StartServer, certificates: Certificates
) -> None:
    server = await start_server(tls=certificates.server_settings(mutual=True), health_port=0)
    health_port = server.server.health_server
    assert health_port is not None and health_port.port != server.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await check(stub) == SERVING
        assert await check(stub, "sluice.model.mlp") == SERVING
        assert await check(stub, LIVENESS_SERVICE) == SERVING
        # Health only: nothing else is served on it.
        infer = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(b"")
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await server.service.unload("mlp")
        assert await check(stub, "sluice.model.mlp") == NOT_SERVING


async def test_connections_are_aged_out_so_clients_reconnect(start_server: StartServer) -> None:
    server = await start_server(max_connection_age_s=0.5, max_connection_age_grace_s=0.1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await check(stub) == SERVING
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # The server sends GOAWAY once the connection is about half a second old: the
        # channel leaves READY by itself, and the next call opens a new connection.
        async with asyncio.timeout(10):
            await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        assert await check(stub) == SERVING
