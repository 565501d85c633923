"""Fallback chains, the retry layer and fault injection over a real server, on the real
ONNX example models (faults injected from the models' config)."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, StartServer

ONES = np.ones((1, 16), dtype=np.int32)


def simple_request(model: str, datatype: str = "INT32") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype=datatype, shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[ONES.tobytes(), ONES.tobytes()],
    )


def with_backup(repository: Path, primary_config: str, backup_config: str = "") -> Path:
    """``simple`` gets ``primary_config``; ``simple_b`` is a copy of it as the fallback."""
    shutil.copytree(repository / "simple", repository / "simple_b")
    (repository / "simple" / "config.yaml").write_text(primary_config)
    if backup_config:
        (repository / "simple_b" / "config.yaml").write_text(backup_config)
    return repository


@pytest.fixture
async def stub_for() -> AsyncIterator[object]:
    channels: list[grpc.aio.Channel] = []

    def make(server: RunningServer) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.aio.insecure_channel(server.address)
        channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


def sample(server: RunningServer, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def call(stub: pb_grpc.GRPCInferenceServiceStub, model: str, **kwargs: object) -> tuple:
    response_call = stub.ModelInfer(simple_request(model), **kwargs)  # type: ignore[arg-type]
    response = await response_call
    trailers = dict(await response_call.trailing_metadata() or ())
    return response, trailers


async def test_failing_primary_opens_its_breaker_and_fallback_answers_every_call(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(
        example_repository, "faults: {mode: fail}\nfallbacks: [{model: simple_b}]\n"
    )
    server = await start_server(repository=repository, breaker={"fail_max": 3})
    stub = stub_for(server)  # type: ignore[operator]
    for _ in range(8):
        response, trailers = await call(stub, "simple")
        out = np.frombuffer(response.raw_output_contents[0], np.int32)
        np.testing.assert_array_equal(out, (ONES + ONES).ravel())
        assert trailers["x-sluice-served-by"] == "simple_b/1/onnxruntime"
        assert trailers["x-sluice-fallback"] == "true"
        assert response.parameters["sluice_fallback"].bool_param
    state = {"model": "simple", "version": "1", "backend": "onnxruntime"}
    assert sample(server, "sluice_breaker_state", state) == 2  # open
    # Three attempts on the primary opened it; the other calls went straight to the backup.
    # Falling back is not retrying: the retry budget was never touched.
    assert sample(server, "sluice_retries_total", {"model": "simple"}) == 0
    assert (
        sample(server, "sluice_fallbacks_total", {"model": "simple", "target": "simple_b/1"}) == 8
    )
    skipped = {"model": "simple", "target": "simple", "reason": "breaker"}
    assert sample(server, "sluice_fallback_skipped_total", skipped) == 5
    primary = server.service.statistics("simple")[0][2]
    assert primary.execution_count == 0 and primary.fail.count == 3


async def test_alias_routes_to_its_chain(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(example_repository, "faults: {mode: fail}\n")
    server = await start_server(
        repository=repository,
        aliases={"classifier": [{"model": "simple"}, {"model": "simple_b", "quality": 0.9}]},
    )
    stub = stub_for(server)  # type: ignore[operator]
    _, trailers = await call(stub, "classifier")
    assert trailers["x-sluice-served-by"] == "simple_b/1/onnxruntime"


async def test_hanging_primary_costs_only_its_share_of_the_deadline(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(
        example_repository, "faults: {mode: hang}\nfallbacks: [{model: simple_b}]\n"
    )
    server = await start_server(repository=repository, retry={"attempt_share": 0.5})
    stub = stub_for(server)  # type: ignore[operator]
    response, trailers = await call(stub, "simple", timeout=1.0)
    assert trailers["x-sluice-served-by"] == "simple_b/1/onnxruntime"
    assert response.parameters["sluice_attempts"].int64_param == 2


async def test_fatal_error_is_returned_at_once_and_retried_nowhere(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(example_repository, "fallbacks: [{model: simple_b}]\n")
    server = await start_server(repository=repository)
    stub = stub_for(server)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(simple_request("simple", datatype="FP32"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(server, "sluice_retries_total", {"model": "simple"}) == 0
    assert server.service.statistics("simple_b")[0][2].fail.count == 0


def backend_attempts(server: RunningServer, *names: str) -> int:
    """Attempts the models' backends ran (each answered or failed)."""
    stats = [server.service.statistics(name)[0][2] for name in names]
    return sum(s.fail.count + s.success.count for s in stats)


async def test_a_flaky_primary_with_a_healthy_fallback_fails_no_call(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(
        example_repository,
        "faults: {mode: fail, probability: 0.5, seed: 7}\nfallbacks: [{model: simple_b}]\n",
    )
    server = await start_server(repository=repository)  # default retry and breaker settings
    stub = stub_for(server)  # type: ignore[operator]
    served: Counter[str] = Counter()

    async def caller() -> None:
        for _ in range(100):
            _, trailers = await call(stub, "simple")  # any failure fails the test
            served[trailers["x-sluice-served-by"]] += 1

    await asyncio.gather(*(caller() for _ in range(8)))
    assert sum(served.values()) == 800
    assert served["simple_b/1/onnxruntime"] > 0, served
    assert sample(server, "sluice_retries_total", {"model": "simple"}) == 0


async def test_retry_budget_caps_attempts_in_a_total_outage(
    start_server: StartServer,
    example_repository: Path,
    stub_for: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = "faults: {mode: fail}\n"
    repository = with_backup(
        example_repository, failing + "fallbacks: [{model: simple_b}]\n", failing
    )
    server = await start_server(
        repository=repository,
        breaker={"fail_max": 1000},
        retry={"budget_ratio": 0.0, "budget_min_retries": 2, "max_attempts": 5},
    )
    stub = stub_for(server)  # type: ignore[operator]
    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(simple_request("simple"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "skipped simple_b: the retry budget is spent" in str(info.value.details())
    # One attempt per call, plus two the budget allowed: the first call's fallback, which
    # failed too and was charged, and its one retry of the primary.
    assert backend_attempts(server, "simple", "simple_b") == 10 + 2
    assert sample(server, "sluice_retries_total", {"model": "simple"}) == 1
    skipped = {"model": "simple", "target": "simple_b", "reason": "budget"}
    assert sample(server, "sluice_fallback_skipped_total", skipped) == 10
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attempt ")][-1]
    assert "model=simple " in last and last.endswith("skipped=simple_b: budget next=none")


async def test_retry_budget_caps_attempts_in_a_total_outage_under_concurrency(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    failing = "faults: {mode: fail}\n"
    repository = with_backup(
        example_repository, failing + "fallbacks: [{model: simple_b}]\n", failing
    )
    server = await start_server(
        repository=repository,
        breaker={"fail_max": 1000},
        retry={"budget_ratio": 0.1, "budget_min_retries": 2},
    )
    stub = stub_for(server)  # type: ignore[operator]

    async def caller() -> None:
        for _ in range(25):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(simple_request("simple"))

    callers = 8
    await asyncio.gather(*(caller() for _ in range(callers)))
    calls = callers * 25
    budget = int(0.1 * calls)
    # A fallback is charged when it fails, so callers already on their way to one when the
    # budget ran out may each make one attempt more: never more than that.
    assert calls < backend_attempts(server, "simple", "simple_b") <= calls + budget + callers


async def test_every_breaker_open_fails_fast(
    start_server: StartServer, example_repository: Path, stub_for: object
) -> None:
    repository = with_backup(example_repository, "faults: {mode: fail}\n")
    server = await start_server(
        repository=repository, breaker={"fail_max": 1}, retry={"max_attempts": 1}
    )
    stub = stub_for(server)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(simple_request("simple"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(simple_request("simple"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "breaker" in (info.value.details() or "")
    assert server.service.statistics("simple")[0][2].fail.count == 1  # never reached again


async def test_another_backend_of_the_same_model_is_a_fallback(
    start_server: StartServer, tmp_path: Path, stub_for: object
) -> None:
    import onnxruntime as ort

    from tests import models

    mlp = models.make_mlp()
    onnx_file = models.write_onnx(mlp, tmp_path / "model.onnx")
    models.write_model_folder(
        tmp_path / "repo",
        "twin",
        {"model.onnx": onnx_file, "model.pt2": models.write_exported(mlp, tmp_path / "model.pt2")},
        config="backend: onnxruntime\nfaults: {mode: fail, backends: [onnxruntime]}\n"
        "fallbacks: [{backend: pytorch}]\n",
    )
    server = await start_server(repository=tmp_path / "repo")
    x = models.sample(3)
    request = pb.ModelInferRequest(
        model_name="twin",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[3, 64])
        ],
        raw_input_contents=[x.tobytes()],
    )
    stub = stub_for(server)  # type: ignore[operator]
    response_call = stub.ModelInfer(request)
    response = await response_call
    trailers = dict(await response_call.trailing_metadata() or ())
    assert trailers["x-sluice-served-by"] == "twin/1/pytorch"
    assert trailers["x-sluice-fallback"] == "true"
    expected = ort.InferenceSession(str(onnx_file)).run(None, {"input": x})[0]
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
