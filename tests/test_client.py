"""sluice_client.Client and AsyncClient against a real server.

Every test runs with both clients. The blocking client is driven from a worker thread
(``asyncio.to_thread``) so the server, which runs on the test's event loop, keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from sluice.app import EXAMPLE_REPOSITORY
from sluice_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ModelMetadata,
    NotFound,
    RepositoryModel,
    ResourceExhausted,
    ServerMetadata,
    TensorMetadata,
    Unavailable,
    channel_options,
)
from sluice_client.tensors import DATATYPES
from tests.conftest import RunningServer, StartServer

PASSTHROUGH_VALUES: dict[str, Any] = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 1, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 2, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 3, 2**63 - 1]], np.int64),
    "UINT8": np.array([[0, 255]], np.uint8),
    "UINT16": np.array([[0, 65535]], np.uint16),
    "UINT32": np.array([[0, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 2**64 - 1]], np.uint64),
    "FP16": np.array([[0.1, -65504.0, 6e-8, np.inf]], np.float16),
    "FP32": np.array([[0.1, -3.4e38, 1e-45]], np.float32),
    "FP64": np.array([[0.1, 1e308, -5e-324]], np.float64),
    # ONNX string tensors hold UTF-8 text, so the passthrough model takes only UTF-8 bytes.
    "BYTES": np.array([[b"", b"\x00raw", "żółw".encode(), b"tail\x00"]], dtype=object),
}


class ThreadedClient:
    """A blocking ``Client`` whose calls run in a worker thread and are awaited."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


Connect = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """Open a client of the parametrized kind to an address; all closed at teardown."""
    opened: list[Client | AsyncClient] = []

    def open_client(address: str, **kwargs: Any) -> Any:
        if request.param == "async":
            opened.append(AsyncClient(address, **kwargs))
            return opened[-1]
        client = Client(address, **kwargs)
        opened.append(client)
        return ThreadedClient(client)

    yield open_client
    for client in opened:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()


@pytest.fixture
def client(server: RunningServer, connect: Connect) -> Any:
    return connect(server.address)


async def test_server_probes_and_metadata(client: Any) -> None:
    assert await client.live() is True
    assert await client.ready() is True
    assert await client.health() == "SERVING"
    assert await client.health("sluice.model.simple") == "SERVING"
    metadata = await client.server_metadata()
    assert isinstance(metadata, ServerMetadata)
    assert metadata.name == "sluice"
    assert "model_repository" in metadata.extensions


async def test_model_readiness_metadata_and_config(client: Any) -> None:
    assert await client.model_ready("mlp") is True
    assert await client.model_ready("mlp", "2") is True
    assert await client.model_ready("mlp", "1") is False
    assert await client.model_ready("nope") is False
    assert await client.model_metadata("mlp") == ModelMetadata(
        name="mlp",
        versions=["2"],
        platform="onnxruntime_onnx",
        inputs=[TensorMetadata("input", "FP32", [-1, 64])],
        outputs=[
            TensorMetadata("logits", "FP32", [-1, 10]),
            TensorMetadata("probabilities", "FP32", [-1, 10]),
        ],
    )
    config = await client.model_config("simple", "1")
    assert config.name == "simple"
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert config.max_batch_size > 0


async def test_models_lists_the_repository(client: Any) -> None:
    assert await client.models() == [
        RepositoryModel("mlp", "2", "READY", ""),
        RepositoryModel("passthrough", "1", "READY", ""),
        RepositoryModel("simple", "1", "READY", ""),
        RepositoryModel("tiny_llama", "1", "READY", ""),
    ]


async def test_infer_simple_matches_numpy(client: Any) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    result = await client.infer("simple", {"INPUT0": a, "INPUT1": b}, request_id="req-1")
    assert (result.model, result.version, result.id) == ("simple", "1", "req-1")
    assert result.datatypes == {"OUTPUT0": "INT32", "OUTPUT1": "INT32"}
    np.testing.assert_array_equal(result.outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(result.outputs["OUTPUT1"], a - b)


async def test_infer_returns_only_the_requested_outputs(client: Any) -> None:
    a = np.ones((1, 16), np.int32)
    result = await client.infer("simple", {"INPUT0": a, "INPUT1": a}, outputs=["OUTPUT1"])
    assert list(result.outputs) == ["OUTPUT1"]
    np.testing.assert_array_equal(result.outputs["OUTPUT1"], np.zeros((1, 16), np.int32))


async def test_infer_mlp_matches_onnxruntime(client: Any) -> None:
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    session = ort.InferenceSession(
        str(EXAMPLE_REPOSITORY / "mlp" / "2" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, probabilities = session.run(["logits", "probabilities"], {"input": x})
    result = await client.infer("mlp", {"input": x}, version="2")
    assert result.version == "2"
    np.testing.assert_allclose(result.outputs["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.outputs["probabilities"], probabilities, rtol=1e-5, atol=1e-6)


async def test_passthrough_round_trips_every_datatype_exactly(client: Any) -> None:
    """Every OIP datatype but BF16 (see scripts/build_example_models.py for why not)."""
    assert set(PASSTHROUGH_VALUES) == set(DATATYPES) - {"BF16"}
    metadata = await client.model_metadata("passthrough")
    assert {tensor.datatype for tensor in metadata.inputs} == set(PASSTHROUGH_VALUES)
    result = await client.infer("passthrough", PASSTHROUGH_VALUES)
    for name, sent in PASSTHROUGH_VALUES.items():
        received = result.outputs[f"{name}_OUT"]
        assert result.datatypes[f"{name}_OUT"] == name
        assert received.dtype == sent.dtype
        assert received.shape == sent.shape
        assert received.tolist() == sent.tolist()
        if name != "BYTES":
            assert received.tobytes() == sent.tobytes()


async def test_infer_sends_str_arrays_as_bytes(client: Any) -> None:
    inputs = {**PASSTHROUGH_VALUES, "BYTES": np.array([["a", "żółw"]])}
    result = await client.infer("passthrough", inputs, outputs=["BYTES_OUT"])
    assert result.outputs["BYTES_OUT"].tolist() == [[b"a", "żółw".encode()]]


async def test_statistics_count_inferences(client: Any) -> None:
    a = np.ones((2, 16), np.int32)
    for _ in range(2):
        await client.infer("simple", {"INPUT0": a, "INPUT1": a})
    [stats] = await client.statistics("simple")
    assert (stats.name, stats.version) == ("simple", "1")
    assert stats.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count == 0
    assert stats.execution_count >= 1
    assert stats.last_inference_ms > 0
    everything = await client.statistics()
    assert {(s.name, s.version) for s in everything} == {
        ("mlp", "2"),
        ("passthrough", "1"),
        ("simple", "1"),
        ("tiny_llama", "1"),
    }


async def test_unknown_model_is_not_found_with_a_request_id(client: Any) -> None:
    with pytest.raises(NotFound) as caught:
        await client.infer("nope", {"INPUT0": np.ones((1, 16), np.int32)})
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.details
    assert caught.value.request_id
    with pytest.raises(NotFound):
        await client.model_metadata("nope")


async def test_wrong_datatype_is_invalid_argument(client: Any) -> None:
    a = np.ones((1, 16), np.float32)
    with pytest.raises(InvalidArgument) as caught:
        await client.infer("simple", {"INPUT0": a, "INPUT1": a}, request_id="bad-dtype")
    assert "FP32" in caught.value.details
    assert caught.value.request_id == "bad-dtype"


async def test_unknown_health_service_is_not_found(client: Any) -> None:
    with pytest.raises(NotFound):
        await client.health("sluice.model.nope")


@pytest.fixture
async def holding_server(start_server: StartServer, example_repository: Path) -> RunningServer:
    """A server whose ``simple`` model holds every request in its batch queue for a minute
    (waiting for a batch of 32), so any short deadline passes first."""
    (example_repository / "simple" / "config.yaml").write_text(
        "max_batch_size: 32\n"
        "dynamic_batching:\n  max_queue_delay_us: 60000000\n  preferred_batch_sizes: [32]\n"
    )
    return await start_server(repository=example_repository)


async def test_per_call_timeout_reaches_the_call(
    holding_server: RunningServer, connect: Connect
) -> None:
    client = connect(holding_server.address)
    a = np.ones((1, 16), np.int32)
    with pytest.raises(DeadlineExceeded) as caught:
        await client.infer("simple", {"INPUT0": a, "INPUT1": a}, timeout_s=0.05)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_client_timeout_is_the_default_deadline(
    holding_server: RunningServer, connect: Connect
) -> None:
    client = connect(holding_server.address, timeout_s=0.05)
    a = np.ones((1, 16), np.int32)
    with pytest.raises(DeadlineExceeded):
        await client.infer("simple", {"INPUT0": a, "INPUT1": a})
    # The client still works afterwards (a per-call timeout overrides the tight default).
    assert await client.ready(timeout_s=10) is True


async def test_oversized_message_is_resource_exhausted(
    start_server: StartServer, connect: Connect
) -> None:
    running = await start_server(max_message_bytes=4096)
    client = connect(running.address)
    big = np.ones((64, 16), np.int32)
    with pytest.raises(ResourceExhausted):
        await client.infer("simple", {"INPUT0": big, "INPUT1": big})


async def test_unavailable_is_retried_with_pushback_then_raised(
    start_server: StartServer, connect: Connect
) -> None:
    running = await start_server(admission={"pushback_ms": 7})
    client = connect(running.address)
    running.server.admission.begin_drain()
    a = np.ones((1, 16), np.int32)
    with pytest.raises(Unavailable) as caught:
        await client.infer("simple", {"INPUT0": a, "INPUT1": a})
    assert await client.live() is True  # probes are never shed
    assert caught.value.retry_after_ms == 7
    assert caught.value.request_id
    rejected = running.metrics.registry.get_sample_value(
        "sluice_rejected_requests_total", {"reason": "draining"}
    )
    assert rejected == 4  # the default RetryPolicy's max_attempts


async def test_load_and_unload(
    start_server: StartServer, connect: Connect, example_repository: Path
) -> None:
    running = await start_server(repository=example_repository)
    client = connect(running.address)
    await client.unload_model("simple")
    assert await client.model_ready("simple") is False
    assert RepositoryModel("simple", "", "UNAVAILABLE", "unloaded") in await client.models()
    a = np.ones((1, 16), np.int32)
    with pytest.raises(Unavailable, match="not loaded"):
        await client.infer("simple", {"INPUT0": a, "INPUT1": a})
    await client.load_model("simple")
    assert await client.model_ready("simple") is True
    result = await client.infer("simple", {"INPUT0": a, "INPUT1": a})
    np.testing.assert_array_equal(result.outputs["OUTPUT0"], a + a)
    with pytest.raises(NotFound):
        await client.load_model("nope")


async def test_given_channel_is_left_open(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        async with AsyncClient(channel) as client:
            assert await client.live() is True
        assert await AsyncClient(channel).ready() is True
    with grpc.insecure_channel(server.address) as sync_channel:
        with Client(sync_channel) as sync_client:
            assert await asyncio.to_thread(sync_client.live) is True
        assert await asyncio.to_thread(Client(sync_channel).ready) is True


def test_round_robin_channels_balance_over_replicas_and_leave_unhealthy_ones_out() -> None:
    options = dict(channel_options(load_balancing="round_robin"))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert "retryPolicy" in config["methodConfig"][0]
    plain = json.loads(dict(channel_options())["grpc.service_config"])
    assert "loadBalancingConfig" not in plain and "healthCheckConfig" not in plain
