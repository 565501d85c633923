"""Shadow traffic over a real server: sampling, failing and hung shadows, the kill switch,
and the comparisons of tensor and generation models, read through the gRPC API."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest

from sluice.domain import OutputTensor
from sluice.errors import ConfigError
from sluice.executors.registry import BackendRegistry
from sluice.repository import read_config
from sluice.shadow import Mismatch, compare_tensors, compare_tokens
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from sluice_api.sluice.v1 import model_service_pb2 as models
from sluice_api.sluice.v1 import model_service_pb2_grpc as models_grpc
from tests.conftest import RunningServer, StartServer
from tests.fakes import Behaviour, FakeFactory

ROWS = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[RunningServer], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(server: RunningServer) -> grpc.aio.Channel:
        channels.append(grpc.aio.insecure_channel(server.address))
        return channels[-1]

    yield open_channel
    for channel in channels:
        await channel.close()


def copy_model(repository: Path, source: str, name: str, *, version: str = "") -> None:
    """``name``: a copy of ``source`` (only its ``version`` folder, as version 1, if given)."""
    if version:
        shutil.copytree(repository / source / version, repository / name / "1")
    else:
        shutil.copytree(repository / source, repository / name)


def add_config(repository: Path, model: str, text: str) -> None:
    with (repository / model / "config.yaml").open("a") as config:
        config.write(text)


def mlp_request(model: str = "mlp") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
        ],
        raw_input_contents=[ROWS.tobytes()],
    )


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        tensor.name: np.frombuffer(raw, np.float32)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


async def report(channel: grpc.aio.Channel, model: str) -> models.ShadowReport:
    response = await models_grpc.ModelServiceStub(channel).GetShadowReport(
        models.GetShadowReportRequest(model_name=model)
    )
    assert [r.model_name for r in response.reports] == [model]
    return response.reports[0]


async def report_when(
    channel: grpc.aio.Channel, model: str, condition: Callable[[models.ShadowReport], bool]
) -> models.ShadowReport:
    """The model's report once ``condition`` holds (mirrors finish in the background)."""
    async with asyncio.timeout(15):
        while not condition(found := await report(channel, model)):
            await asyncio.sleep(0.01)
    return found


def settled(r: models.ShadowReport) -> bool:
    return r.compared + r.failed == r.mirrored


def shadow_metric(server: RunningServer, outcome: str, model: str = "mlp") -> float:
    labels = {"model": model, "outcome": outcome}
    return server.metrics.registry.get_sample_value("sluice_shadow_requests_total", labels) or 0.0


async def set_shadowing(channel: grpc.aio.Channel, enabled: bool) -> bool:
    response = await models_grpc.ModelServiceStub(channel).SetShadowing(
        models.SetShadowingRequest(enabled=enabled, reason="shadow test")
    )
    return response.enabled


# -- sampling -----------------------------------------------------------------------------


async def test_sampled_share_holds_within_binomial_bounds(
    start_server: StartServer, example_repository: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    copy_model(example_repository, "mlp", "mlp_copy")
    add_config(example_repository, "mlp", "shadow: {model: mlp_copy, fraction: 0.25}\n")
    server = await start_server(
        repository=example_repository, shadow={"seed": 7, "max_concurrency": 64}
    )
    channel = channel_to(server)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = 400
    for _ in range(calls):
        await stub.ModelInfer(mlp_request())
    found = await report_when(channel, "mlp", settled)
    sampled = found.mirrored + found.skipped
    # Binomial(400, 0.25): mean 100, standard deviation 8.66; four of them either side.
    spread = 4 * math.sqrt(calls * 0.25 * 0.75)
    assert 100 - spread <= sampled <= 100 + spread
    assert found.mirrored > 0 and found.failed == 0 and found.compared == found.mirrored
    assert (found.shadow_target, found.sample_fraction) == ("mlp_copy", 0.25)
    assert shadow_metric(server, "mirrored") == found.mirrored
    assert shadow_metric(server, "compared") == found.compared


# -- comparisons --------------------------------------------------------------------------


async def test_copy_of_the_primary_compares_equal_and_another_version_differs(
    start_server: StartServer, example_repository: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    copy_model(example_repository, "mlp", "mlp_copy", version="2")
    copy_model(example_repository, "mlp", "mlp_v1", version="1")
    copy_model(example_repository, "mlp", "mlp_b", version="2")
    add_config(example_repository, "mlp", "shadow: {model: mlp_copy, fraction: 1.0}\n")
    add_config(example_repository, "mlp_b", "shadow: {model: mlp_v1, fraction: 1.0}\n")
    server = await start_server(repository=example_repository, shadow={"max_concurrency": 64})
    channel = channel_to(server)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    unshadowed = outputs(await stub.ModelInfer(mlp_request("mlp_copy")))
    version_1 = outputs(await stub.ModelInfer(mlp_request("mlp_v1")))
    for _ in range(5):
        for model in ("mlp", "mlp_b"):
            answer = outputs(await stub.ModelInfer(mlp_request(model)))
            for name, values in unshadowed.items():  # the primary's answer, never the shadow's
                np.testing.assert_array_equal(answer[name], values)
    same = await report_when(channel, "mlp", lambda r: r.compared == 5)
    assert (same.max_abs_diff, same.max_rel_diff, same.failed) == (0.0, 0.0, 0)
    other = await report_when(channel, "mlp_b", lambda r: r.compared == 5)
    expected = max(float(np.abs(unshadowed[n] - version_1[n]).max()) for n in unshadowed)
    assert other.max_abs_diff == pytest.approx(expected, rel=1e-6)
    assert 0 < other.max_rel_diff <= 2
    gauge = server.metrics.registry.get_sample_value(
        "sluice_shadow_max_abs_diff", {"model": "mlp_b"}
    )
    assert gauge == other.max_abs_diff
    everything = await models_grpc.ModelServiceStub(channel).GetShadowReport(
        models.GetShadowReportRequest()
    )
    assert everything.enabled
    assert [r.model_name for r in everything.reports] == ["mlp", "mlp_b"]


async def test_greedy_generations_are_compared_token_by_token(
    start_server: StartServer, example_repository: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    copy_model(example_repository, "tiny_llama", "tiny_copy")
    add_config(example_repository, "tiny_llama", "shadow: {model: tiny_copy, fraction: 1.0}\n")
    server = await start_server(repository=example_repository)
    channel = channel_to(server)
    stub = gen_grpc.GenerationServiceStub(channel)

    async def generate(**params: float) -> str:
        request = gen.GenerateRequest(
            model_name="tiny_llama",
            prompt="Once upon a time",
            parameters=gen.SamplingParameters(max_new_tokens=8, **params),  # type: ignore[arg-type]
        )
        return "".join([chunk.text async for chunk in stub.Generate(request)])

    texts = {await generate() for _ in range(3)}
    await generate(temperature=0.8, seed=1)  # sampled draws are never compared
    found = await report_when(channel, "tiny_llama", lambda r: r.compared >= 3)
    assert len(texts) == 1
    assert (found.mirrored, found.compared, found.failed) == (3, 3, 0)
    assert (found.exact_match_rate, found.token_agreement) == (1.0, 1.0)
    registry = server.metrics.registry
    labels = {"model": "tiny_llama"}
    assert registry.get_sample_value("sluice_shadow_exact_matches_total", labels) == 3
    tokens = registry.get_sample_value("sluice_shadow_tokens_total", labels)
    agreeing = registry.get_sample_value("sluice_shadow_agreeing_tokens_total", labels)
    assert tokens is not None and tokens >= 3
    assert agreeing == tokens


def test_tensor_comparison_takes_the_largest_differences_and_refuses_other_shapes() -> None:
    def tensors(**arrays: np.ndarray) -> list[OutputTensor]:
        return [OutputTensor(name, "FP32", array) for name, array in arrays.items()]

    ours = tensors(a=np.array([1.0, -2.0, 0.0]), b=np.array([[np.nan, 4.0]]))
    theirs = tensors(a=np.array([1.5, -2.0, 0.0]), b=np.array([[np.nan, 3.0]]))
    # a: |1 - 1.5| = 0.5, relative 0.5 / 1.5; b: NaN equals NaN, |4 - 3| = 1, relative 0.25.
    assert compare_tensors(ours, theirs) == pytest.approx((1.0, 1 / 3))
    assert compare_tensors(ours, ours) == (0.0, 0.0)
    with pytest.raises(Mismatch, match="shape"):
        compare_tensors(ours, tensors(a=np.zeros(2), b=np.zeros((1, 2))))
    with pytest.raises(Mismatch, match="no output 'b'"):
        compare_tensors(ours, tensors(a=np.zeros(3)))
    words = [OutputTensor("w", "BYTES", np.array([b"x"], dtype=object))]
    assert compare_tensors(words, words) == (0.0, 0.0)
    with pytest.raises(Mismatch, match="not numbers"):
        compare_tensors(words, [OutputTensor("w", "BYTES", np.array([b"y"], dtype=object))])


def test_token_comparison_counts_agreeing_positions_over_the_longer_output() -> None:
    assert compare_tokens([1, 2, 3], [1, 2, 3]) == (True, 3, 3)
    assert compare_tokens([1, 2, 3], [1, 9, 3, 4]) == (False, 2, 4)
    assert compare_tokens([], []) == (True, 0, 0)


def test_shadow_config_is_validated(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("shadow: {model: other, fraction: 1.5}\n")
    with pytest.raises(ConfigError, match=r"shadow\.fraction"):
        read_config(tmp_path)
    (tmp_path / "config.yaml").write_text("shadow: {fraction: 0.5}\n")
    with pytest.raises(ConfigError, match="name the shadow's model"):
        read_config(tmp_path)
    (tmp_path / "config.yaml").write_text("shadow: {version: '1', fraction: 0.5, budget_s: 2}\n")
    shadow = read_config(tmp_path).shadow
    assert shadow is not None and (shadow.version, shadow.budget_s) == ("1", 2)


# -- failures, budget, concurrency, kill switch -------------------------------------------


async def test_failing_shadow_never_reaches_the_caller_and_is_counted(
    start_server: StartServer, example_repository: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    copy_model(example_repository, "mlp", "mlp_copy", version="2")
    (example_repository / "mlp_copy" / "config.yaml").write_text("faults: {mode: fail}\n")
    add_config(example_repository, "mlp", "shadow: {model: mlp_copy, fraction: 1.0}\n")
    server = await start_server(
        repository=example_repository, breaker={"fail_max": 3}, shadow={"max_concurrency": 64}
    )
    channel = channel_to(server)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    first = outputs(await stub.ModelInfer(mlp_request()))
    for _ in range(9):
        answer = outputs(await stub.ModelInfer(mlp_request()))
        np.testing.assert_array_equal(answer["logits"], first["logits"])
    found = await report_when(channel, "mlp", lambda r: r.failed == 10)
    assert (found.mirrored, found.compared, found.skipped) == (10, 0, 0)
    assert shadow_metric(server, "failed") == 10
    primary = {"model": "mlp", "version": "2", "backend": "onnxruntime"}
    assert server.metrics.registry.get_sample_value("sluice_breaker_state", primary) == 0
    assert server.service.statistics("mlp")[0][2].fail.count == 0


class _HeldFactory(FakeFactory):
    """A second fake backend with its own behaviour, for the shadow."""

    backend: ClassVar[str] = "held"
    filenames: ClassVar[tuple[str, ...]] = ("model.held",)


def fake_request(model: str = "fake") -> pb.ModelInferRequest:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )


async def test_hung_shadow_is_bounded_by_its_budget_and_its_concurrency(
    start_server: StartServer, tmp_path: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    for name, filename in (("fake", "model.fake"), ("held", "model.held")):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / filename).write_text("fake\n")
    (tmp_path / "fake" / "config.yaml").write_text(
        "shadow: {model: held, fraction: 1.0, max_concurrency: 2, budget_s: 2}\n"
    )
    primary, shadow = Behaviour(), Behaviour()
    backends = BackendRegistry([FakeFactory(primary), _HeldFactory(shadow)])
    server = await start_server(repository=tmp_path, backends=backends, probe={"interval_s": 0})
    channel = channel_to(server)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    shadow.hold()  # from now on the shadow never answers
    for _ in range(6):
        response = await stub.ModelInfer(fake_request())
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 2, 4, 6]
    # Every call was answered while both mirrors hung; the other four were skipped.
    during = await report(channel, "fake")
    assert (during.mirrored, during.skipped, during.compared, during.failed) == (2, 4, 0, 0)
    assert shadow_metric(server, "skipped", "fake") == 4
    after = await report_when(channel, "fake", lambda r: r.failed == 2)
    assert after.mirrored == 2
    await stub.ModelInfer(fake_request())  # the budget freed the slots
    assert (await report(channel, "fake")).mirrored == 3
    shadow.release()
    await report_when(channel, "fake", settled)


async def test_kill_switch_stops_mirroring_at_once_and_resumes(
    start_server: StartServer, example_repository: Path, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    copy_model(example_repository, "mlp", "mlp_copy", version="2")
    add_config(example_repository, "mlp", "shadow: {model: mlp_copy, fraction: 1.0}\n")
    server = await start_server(
        repository=example_repository, shadow={"enabled": False, "max_concurrency": 64}
    )
    channel = channel_to(server)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    async def calls(count: int) -> None:
        for _ in range(count):
            await stub.ModelInfer(mlp_request())

    await calls(3)
    assert (await report(channel, "mlp")).mirrored == 0
    assert await set_shadowing(channel, True)
    await calls(4)
    assert (await report(channel, "mlp")).mirrored == 4
    assert not await set_shadowing(channel, False)
    await calls(5)
    response = await models_grpc.ModelServiceStub(channel).GetShadowReport(
        models.GetShadowReportRequest(model_name="mlp")
    )
    assert not response.enabled
    assert response.reports[0].mirrored == 4
    assert await set_shadowing(channel, True)
    await calls(2)
    found = await report_when(channel, "mlp", settled)
    assert (found.mirrored, found.compared) == (6, 6)


async def test_report_of_an_unknown_model_is_not_found(
    server: RunningServer, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    stub = models_grpc.ModelServiceStub(channel_to(server))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetShadowReport(models.GetShadowReportRequest(model_name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    everything = await stub.GetShadowReport(models.GetShadowReportRequest())
    assert everything.enabled and list(everything.reports) == []
