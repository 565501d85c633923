"""Verified health: real test inferences decide readiness and routing."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fake_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="fake",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.ones((1, 4), np.float32).tobytes()],
    )


async def test_failing_probe_takes_the_model_out_until_it_passes(
    start_server: StartServer, tmp_path: Path
) -> None:
    behaviour = Behaviour()
    server = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 4\n"),
        backends=fake_backends(behaviour),
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return int((await health.Check(request)).status)

        behaviour.fail = True
        await server.server.prober.probe_all()
        assert await status("sluice.model.fake") == NOT_SERVING
        assert await status("") == NOT_SERVING  # the only model cannot infer
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="fake"))).ready
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(fake_request())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "health probe" in (info.value.details() or "")
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="fake"))
        assert metadata.name == "fake"  # still described while unhealthy

        behaviour.fail = False
        await server.server.prober.probe_all()
        assert await status("sluice.model.fake") == SERVING
        assert await status("") == SERVING
        await stub.ModelInfer(fake_request())
    assert behaviour.batches[0] == 1  # the probe sent one generated row


async def test_probes_pass_on_every_example_model(start_server: StartServer) -> None:
    server = await start_server()
    await server.server.prober.probe_all()
    assert server.service.ready
    for model in ("simple", "mlp", "passthrough"):
        assert server.service.is_ready(model)
        assert server.service.statistics(model)[0][2].execution_count == 1


async def test_unhealthy_primary_leaves_routing_to_its_fallback(
    start_server: StartServer, example_repository: Path
) -> None:
    shutil.copytree(example_repository / "simple", example_repository / "simple_b")
    (example_repository / "simple" / "config.yaml").write_text(
        "faults: {mode: fail}\nfallbacks: [{model: simple_b}]\n"
    )
    server = await start_server(repository=example_repository)
    await server.server.prober.probe_all()
    ones = np.ones((1, 16), np.int32).tobytes()
    request = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[ones, ones],
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.parameters["sluice_served_by"].string_param == "simple_b/1/onnxruntime"
    assert response.parameters["sluice_attempts"].int64_param == 1  # never tried the primary
