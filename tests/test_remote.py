"""Remote candidates: a fallback (or an alias entry) served by a second, real Sluice server
over the Open Inference Protocol, both servers on 127.0.0.1 port 0, real ONNX models."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from sluice.repository import EXAMPLE_REPOSITORY
from sluice.settings import Settings
from sluice.tracing import Tracing
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import model_service_pb2 as models_pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as models_grpc
from tests.certs import Certificates
from tests.conftest import RunningServer, StartServer
from tests.test_routing import ONES, sample, simple_request
from tests.test_validation import passthrough_bytes

SERVER_SPAN = "inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for channel in opened:
        await channel.close()


@pytest.fixture
async def traced() -> AsyncIterator[list[tuple[Tracing, InMemorySpanExporter]]]:
    made: list[tuple[Tracing, InMemorySpanExporter]] = []
    yield made
    for tracing, _ in made:
        await tracing.shutdown()


def new_tracing(
    made: list[tuple[Tracing, InMemorySpanExporter]],
) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    made.append((Tracing.with_exporter(exporter), exporter))
    return made[-1]


def stub(server: RunningServer, opened: list[grpc.aio.Channel]) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.aio.insecure_channel(server.address)
    opened.append(channel)
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def copy_repository(tmp_path: Path, name: str, simple_config: str = "") -> Path:
    target = tmp_path / name
    shutil.copytree(EXAMPLE_REPOSITORY, target)
    if simple_config:
        (target / "simple" / "config.yaml").write_text(simple_config)
    return target


def failing_primary(tmp_path: Path, remote: str, tls: str = "") -> Path:
    """``simple`` here always fails; its fallback is ``simple`` on the server at ``remote``."""
    extra = f", tls: {tls}" if tls else ""
    config = (
        f"faults: {{mode: fail}}\nfallbacks: [{{endpoint: '{remote}', model: simple{extra}}}]\n"
    )
    return copy_repository(tmp_path, "local", config)


async def infer(
    client: pb_grpc.GRPCInferenceServiceStub, model: str = "simple", **kwargs: object
) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    call = client.ModelInfer(simple_request(model), **kwargs)
    response = await call
    return response, dict(await call.trailing_metadata() or ())


def served_calls(server: RunningServer) -> float:
    """ModelInfer calls the server has finished, whatever their status."""
    return sum(
        sample.value
        for metric in server.metrics.registry.collect()
        if metric.name == "sluice_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("method", "").endswith("ModelInfer")
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def assert_sum(response: pb.ModelInferResponse) -> None:
    out = np.frombuffer(response.raw_output_contents[0], np.int32)
    np.testing.assert_array_equal(out, (ONES + ONES).ravel())


async def test_a_failing_primary_falls_back_to_a_remote_sluice_that_sees_the_call_context(
    start_server: StartServer,
    tmp_path: Path,
    channels: list[grpc.aio.Channel],
    traced: list[tuple[Tracing, InMemorySpanExporter]],
) -> None:
    remote_tracing, remote_spans = new_tracing(traced)
    local_tracing, local_spans = new_tracing(traced)
    remote = await start_server(
        repository=copy_repository(tmp_path, "remote"), tracing=remote_tracing
    )
    local = await start_server(
        repository=failing_primary(tmp_path, remote.address), tracing=local_tracing
    )
    client = stub(local, channels)
    for number in range(3):
        response, trailers = await infer(client, metadata=(("x-request-id", f"far-{number}"),))
        assert_sum(response)
        assert trailers["x-sluice-endpoint"] == remote.address
        assert trailers["x-sluice-served-by"] == "simple/1/remote"
        assert trailers["x-sluice-fallback"] == "true"
        assert response.parameters["sluice_endpoint"].string_param == remote.address
    labels = {"endpoint": remote.address, "model": "simple", "code": "OK"}
    assert sample(local, "sluice_remote_requests_total", labels) == 3
    assert (
        sample(
            local,
            "sluice_remote_request_duration_seconds_count",
            {"endpoint": remote.address, "model": "simple"},
        )
        == 3
    )
    assert sample(local, "sluice_remote_inflight_requests", {"endpoint": remote.address}) == 0

    assert await local_tracing.flush() and await remote_tracing.flush()
    outbound = [s for s in local_spans.get_finished_spans() if s.name == "sluice.remote"]
    assert len(outbound) == 3
    assert {s.attributes["sluice.endpoint"] for s in outbound if s.attributes} == {remote.address}
    served: dict[str, ReadableSpan] = {}
    for span in remote_spans.get_finished_spans():
        if span.name == SERVER_SPAN and span.attributes:
            served[str(span.attributes["sluice.request_id"])] = span
    assert set(served) == {"far-0", "far-1", "far-2"}  # the caller's request ids went along
    by_id = {s.context.span_id: s for s in outbound if s.context is not None}
    for span in served.values():  # and the trace: each remote call is a child of its call
        assert span.parent is not None and span.parent.span_id in by_id
        assert span.context is not None
        assert span.context.trace_id == by_id[span.parent.span_id].context.trace_id


async def test_the_remote_gets_what_is_left_of_the_callers_deadline(
    start_server: StartServer,
    tmp_path: Path,
    channels: list[grpc.aio.Channel],
    traced: list[tuple[Tracing, InMemorySpanExporter]],
) -> None:
    remote_tracing, remote_spans = new_tracing(traced)
    remote = await start_server(
        repository=copy_repository(tmp_path, "remote", "faults: {mode: hang}\n"),
        tracing=remote_tracing,
        deadline={"default_deadline_s": 60},
    )
    local = await start_server(repository=failing_primary(tmp_path, remote.address))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(stub(local, channels), timeout=1.0)
    assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: served_calls(remote) == 1)  # its server span has ended
    assert await remote_tracing.flush()
    budgets = [
        float(span.attributes["sluice.budget_s"])  # type: ignore[arg-type]
        for span in remote_spans.get_finished_spans()
        if span.name == SERVER_SPAN and span.attributes
    ]
    # The remote's own default is 60 s; it got what the 1 s caller had left.
    assert len(budgets) == 1 and 0 < budgets[0] < 1.0


async def test_a_remote_that_is_down_opens_its_breaker_and_is_passed_over(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(repository=copy_repository(tmp_path, "remote"))
    local = await start_server(
        repository=failing_primary(tmp_path, remote.address),
        breaker={"fail_max": 2, "reset_timeout_s": 600},
    )
    client = stub(local, channels)
    _, trailers = await infer(client)
    assert trailers["x-sluice-endpoint"] == remote.address
    await remote.server.grpc_server.stop(0)  # the remote is gone
    codes = []
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await infer(client)
        codes.append(failed.value.code())
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    details = failed.value.details() or ""
    assert f"{remote.address}/simple" in details and "breaker is open" in details
    breaker = {"model": f"{remote.address}/simple", "version": "", "backend": "remote"}
    assert sample(local, "sluice_breaker_state", breaker) == 2  # open
    failures = sample(
        local,
        "sluice_remote_requests_total",
        {"endpoint": remote.address, "model": "simple", "code": "UNAVAILABLE"},
    )
    assert failures == 2  # once open, no more calls go out to it
    skipped = {"model": "simple", "target": f"{remote.address}/simple", "reason": "breaker"}
    assert sample(local, "sluice_fallback_skipped_total", skipped) >= 1


async def test_a_remote_over_tls_with_a_ca_made_here(
    start_server: StartServer,
    tmp_path: Path,
    channels: list[grpc.aio.Channel],
    certificates: Certificates,
) -> None:
    remote = await start_server(
        repository=copy_repository(tmp_path, "remote"),
        tls=certificates.server_settings(mutual=False),
    )
    endpoint = f"127.0.0.1:{remote.port}"
    tls = f"{{ca_file: '{certificates.ca}', server_name: localhost}}"
    local = await start_server(repository=failing_primary(tmp_path, endpoint, tls))
    response, trailers = await infer(stub(local, channels))
    assert_sum(response)
    assert trailers["x-sluice-endpoint"] == endpoint


async def test_an_unready_remote_is_skipped_until_it_is_ready_again(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(repository=copy_repository(tmp_path, "remote"))
    local = await start_server(repository=failing_primary(tmp_path, remote.address))
    client, admin = stub(local, channels), stub(remote, channels)
    await admin.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="simple"))
    await local.server.prober.probe_all()
    ready = {"endpoint": remote.address, "model": "simple", "version": ""}
    assert sample(local, "sluice_remote_ready", ready) == 0
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(client)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    details = failed.value.details() or ""
    assert f"{remote.address}/simple is not ready: ModelReady says not ready" in details
    calls = {"endpoint": remote.address, "model": "simple"}
    assert sample(local, "sluice_remote_request_duration_seconds_count", calls) == 0

    await admin.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))
    await local.server.prober.probe_all()
    assert sample(local, "sluice_remote_ready", ready) == 1
    response, trailers = await infer(client)
    assert_sum(response)
    assert trailers["x-sluice-endpoint"] == remote.address


async def test_an_alias_of_a_remote_model_returns_its_invalid_argument_as_is(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(repository=copy_repository(tmp_path, "remote"))
    local = await start_server(
        repository=copy_repository(tmp_path, "local"),
        aliases={"far": [{"endpoint": remote.address, "model": "simple", "quality": 0.7}]},
        breaker={"fail_max": 1},
    )
    client = stub(local, channels)
    response, trailers = await infer(client, "far")
    assert_sum(response)
    assert trailers["x-sluice-endpoint"] == remote.address
    bad = simple_request("far")
    bad.inputs[0].shape[:] = [1, 15]  # 16 values sent
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.ModelInfer(bad)
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"{remote.address}/simple answered INVALID_ARGUMENT" in (
            failed.value.details() or ""
        )
    response, _ = await infer(client, "far")  # the caller's mistakes never opened its breaker
    assert_sum(response)
    labels = {"endpoint": remote.address, "model": "simple", "code": "INVALID_ARGUMENT"}
    assert sample(local, "sluice_remote_requests_total", labels) == 3


async def test_list_models_names_the_remote_fallback(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(repository=copy_repository(tmp_path, "remote"))
    local = await start_server(repository=failing_primary(tmp_path, remote.address))
    channel = grpc.aio.insecure_channel(local.address)
    channels.append(channel)
    models = models_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    listing = await models.ListModels(models_pb.ListModelsRequest())
    simple = [row for row in listing.models if row.name == "simple"]
    assert simple and list(simple[0].fallbacks) == [f"{remote.address}/simple"]


async def test_calls_over_the_per_endpoint_limit_pass_the_remote_over(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(
        repository=copy_repository(tmp_path, "remote", "faults: {mode: slow, delay_ms: 1000}\n")
    )
    local = await start_server(
        repository=failing_primary(tmp_path, remote.address),
        remote={"max_inflight_per_endpoint": 1},
    )
    client = stub(local, channels)
    first = asyncio.ensure_future(infer(client))
    inflight = {"endpoint": remote.address}
    await until(lambda: sample(local, "sluice_remote_inflight_requests", inflight) == 1)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await infer(client)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "remote.max_inflight_per_endpoint" in (failed.value.details() or "")
    limited = {"endpoint": remote.address, "model": "simple", "code": "LIMIT"}
    assert sample(local, "sluice_remote_requests_total", limited) >= 1
    assert sample(local, "sluice_remote_limit", {"limit": "max_inflight_per_endpoint"}) == 1
    response, trailers = await first  # the call in flight was never disturbed
    assert_sum(response)
    assert trailers["x-sluice-endpoint"] == remote.address


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ({"endpoint": "no-port", "model": "m"}, "endpoint must be host:port"),
        ({"endpoint": "h:99999", "model": "m"}, "endpoint must be host:port"),
        ({"endpoint": "h:8001"}, "needs the model it serves"),
        ({"endpoint": "h:8001", "model": "m", "backend": "pytorch"}, "a remote candidate has none"),
        ({"model": "m", "tls": {"ca_file": "/ca.pem"}}, "tls is for a remote candidate"),
        (
            {"endpoint": "h:8001", "model": "m", "tls": {"cert_file": "/c.pem"}},
            "cert_file and tls.key_file go together",
        ),
    ],
)
def test_a_remote_candidate_that_cannot_work_is_a_settings_error(
    target: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings.model_validate({"aliases": {"far": [target]}})


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


async def test_every_datatype_goes_through_and_a_reply_over_the_bound_is_refused(
    start_server: StartServer, tmp_path: Path, channels: list[grpc.aio.Channel]
) -> None:
    remote = await start_server(repository=copy_repository(tmp_path, "remote"))
    local_repository = copy_repository(tmp_path, "local")
    (local_repository / "passthrough" / "config.yaml").write_text(
        "faults: {mode: fail}\n"
        f"fallbacks: [{{endpoint: '{remote.address}', model: passthrough}}]\n"
    )
    local = await start_server(repository=local_repository, remote={"max_reply_bytes": 4096})
    client = stub(local, channels)
    small = passthrough_bytes(bytes_elements(b"far", b"away"), [1, 2])
    call = client.ModelInfer(small)
    response = await call
    trailers = dict(await call.trailing_metadata() or ())
    assert trailers["x-sluice-endpoint"] == remote.address
    sent = dict(zip([t.name for t in small.inputs], small.raw_input_contents, strict=True))
    returned = dict(
        zip(
            [t.name.removesuffix("_OUT") for t in response.outputs],
            response.raw_output_contents,
            strict=True,
        )
    )
    assert returned == sent  # every datatype's bytes, as the remote sent them back
    large = passthrough_bytes(bytes_elements(b"x" * 3000, b"y" * 3000), [1, 2])
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await client.ModelInfer(large)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "remote.max_reply_bytes (4096)" in (failed.value.details() or "")
