"""sluice.v1.ModelService: capabilities and per-version backend / breaker state."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.executors.capabilities import detect
from sluice_api.inference import grpc_service_pb2 as infer_pb
from sluice_api.inference import grpc_service_pb2_grpc as infer_grpc
from sluice_api.sluice.v1 import model_service_pb2 as pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as pb_grpc
from tests.conftest import StartServer


async def test_capabilities_match_detection(start_server: StartServer) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        caps = await pb_grpc.ModelServiceStub(channel).GetCapabilities(pb.GetCapabilitiesRequest())
    local = detect()
    assert caps.onnxruntime_version == local.onnxruntime
    assert list(caps.onnxruntime_providers) == list(local.ort_providers)
    assert caps.cuda_available == local.cuda_available


async def test_list_models_shows_backend_breaker_and_fallbacks(
    start_server: StartServer, example_repository: Path
) -> None:
    (example_repository / "simple" / "config.yaml").write_text(
        "faults: {mode: fail}\nfallbacks: [{model: mlp, version: '2'}]\n"
    )
    (example_repository / "passthrough" / "config.yaml").write_text("max_batch_size: -1\n")
    server = await start_server(
        repository=example_repository, breaker={"fail_max": 1}, retry={"max_attempts": 1}
    )
    ones = np.ones((1, 16), np.int32).tobytes()
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):  # mlp cannot take simple's inputs
            await infer_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_pb.ModelInferRequest(
                    model_name="simple",
                    inputs=[
                        infer_pb.ModelInferRequest.InferInputTensor(
                            name=n, datatype="INT32", shape=[1, 16]
                        )
                        for n in ("INPUT0", "INPUT1")
                    ],
                    raw_input_contents=[ones, ones],
                )
            )
        listing = await pb_grpc.ModelServiceStub(channel).ListModels(pb.ListModelsRequest())
    rows = {(m.name, m.version): m for m in listing.models}
    simple = rows[("simple", "1")]
    assert simple.state == pb.MODEL_STATE_READY
    assert (simple.backend, simple.device) == ("onnxruntime", "cpu")
    assert simple.backend_rung and simple.backend_reason
    assert simple.breaker_state == pb.BREAKER_STATE_OPEN
    assert list(simple.fallbacks) == ["mlp/2"]
    assert rows[("mlp", "2")].breaker_state == pb.BREAKER_STATE_CLOSED
    broken = rows[("passthrough", "")]
    assert broken.state == pb.MODEL_STATE_UNAVAILABLE
    assert "max_batch_size" in broken.reason
