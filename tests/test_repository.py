"""Model repository: auto-configuration, config errors that name file and field, and one
bad model never stopping the others."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.errors import ConfigError
from sluice.repository import VersionPolicy, read_config
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import StartServer


async def test_model_without_config_is_auto_configured_with_batching(
    start_server: StartServer,
) -> None:
    server = await start_server(batching={"max_batch_size": 16, "max_queue_delay_us": 0})
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="simple"))).config
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="simple"))
    assert config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.parameters["sluice_auto_configured"].string_value == "true"
    assert [tuple(i.dims) for i in config.input] == [(16,), (16,)]
    assert [tuple(i.shape) for i in metadata.inputs] == [(-1, 16), (-1, 16)]
    assert [i.name for i in config.input] == [i.name for i in metadata.inputs]


async def test_bad_config_names_file_and_field_and_spares_other_models(
    start_server: StartServer, example_repository: Path
) -> None:
    (example_repository / "mlp" / "config.yaml").write_text("max_batch_size: -4\n")
    (example_repository / "empty").mkdir()
    server = await start_server(repository=example_repository)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="simple"))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="sluice.model.mlp"))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    states = {(m.name, m.state): m.reason for m in index.models}
    reason = states[("mlp", "UNAVAILABLE")]
    assert "mlp/config.yaml" in reason and "max_batch_size" in reason
    assert "no version folders" in states[("empty", "UNAVAILABLE")]
    assert ("simple", "READY") in states and ("passthrough", "READY") in states


def test_unknown_field_and_datatype_are_named(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "max_batch_sise: 4\ninputs:\n  - {name: x, datatype: FLOAT, dims: [4]}\n"
    )
    with pytest.raises(ConfigError) as info:
        read_config(tmp_path)
    message = info.value.message
    assert str(tmp_path / "config.yaml") in message
    assert "max_batch_sise" in message
    assert "inputs.0.datatype" in message and "FLOAT" in message


def test_config_tensor_must_exist_in_the_model(tmp_path: Path) -> None:
    from sluice.executors.base import DeclaredTensor
    from sluice.repository import ModelConfig, resolve_io

    config = ModelConfig.model_validate(
        {"inputs": [{"name": "wrong", "datatype": "FP32", "dims": [4]}]}
    )
    declared = (DeclaredTensor("x", "FP32", (-1, 4)),)
    with pytest.raises(ConfigError) as info:
        resolve_io(config, declared, declared, where=tmp_path / "config.yaml", default_max_batch=8)
    assert "inputs.0.name" in info.value.message and "'wrong'" in info.value.message


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, [3]),
        ({"latest": 2}, [2, 3]),
        ({"specific": [1, 3]}, [1, 3]),
        ({"all": True}, [1, 2, 3]),
    ],
)
def test_version_policy(policy: dict[str, object], expected: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select([3, 1, 2]) == expected


async def test_version_policy_all_serves_every_version(
    start_server: StartServer, example_repository: Path
) -> None:
    config = example_repository / "mlp" / "config.yaml"
    config.write_text(config.read_text() + "version_policy: {all: true}\n")
    server = await start_server(repository=example_repository)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
        assert list(metadata.versions) == ["1", "2"]
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1"))).ready
