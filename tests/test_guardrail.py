"""The latency guardrail: the p95 window and its hysteresis on a clock moved by hand, then
over a real server whose primary is made slow by an injected fault."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from sluice.metrics import Metrics
from sluice.routing.guardrail import Guardrail, Guardrails, LatencyWindow
from sluice.settings import GuardrailSettings, Settings
from sluice_api.inference import grpc_service_pb2_grpc as infer_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from sluice_api.sluice.v1 import model_service_pb2 as pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as pb_grpc
from sluice_client import AsyncClient
from tests.conftest import FakeClock, RunningServer, StartServer
from tests.test_routing import call, sample, with_backup

KEY = ("m", "1", "onnxruntime")
LABELS = {"model": "m", "version": "1", "backend": "onnxruntime"}


def guard(clock: FakeClock, metrics: Metrics, **settings: float) -> Guardrail:
    values = {"min_samples": 4, "window_calls": 8, "window_s": 40.0, "probe_interval_s": 5.0}
    return Guardrail(
        KEY,
        100.0,
        GuardrailSettings.model_validate(values | settings),
        metrics=metrics,
        clock=clock,
    )


def value(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, LABELS)


# -- the window ----------------------------------------------------------------------------


def test_window_p95_is_the_nearest_rank_of_its_latest_calls() -> None:
    clock = FakeClock()
    window = LatencyWindow(max_calls=20, window_s=60.0, clock=clock)
    assert window.p95() is None
    for ms in range(1, 21):  # 1..20 ms: the 19th of 20 is the p95
        window.add(ms / 1000)
    assert window.p95() == pytest.approx(0.019)
    window.add(0.5)  # the oldest (1 ms) leaves: the window holds the latest 20 only
    assert len(window) == 20
    assert window.p95() == pytest.approx(0.020)


def test_window_forgets_latencies_older_than_its_span() -> None:
    clock = FakeClock()
    window = LatencyWindow(max_calls=100, window_s=10.0, clock=clock)
    window.add(0.9)
    clock.advance(6)
    window.add(0.1)
    assert window.p95() == pytest.approx(0.9)
    clock.advance(5)  # the slow one is 11 s old now
    assert len(window) == 1
    assert window.p95() == pytest.approx(0.1)
    clock.advance(11)
    assert window.p95() is None


# -- trip, probe, recover ------------------------------------------------------------------


def test_slow_calls_are_counted_and_trip_only_with_enough_samples() -> None:
    clock, metrics = FakeClock(), Metrics()
    g = guard(clock, metrics)
    for _ in range(3):
        g.record(0.150)
    assert g.slow_calls == 3 and not g.tripped  # 3 samples < min_samples 4
    assert value(metrics, "sluice_guardrail_slow_calls_total") == 3
    assert value(metrics, "sluice_guardrail_tripped") == 0
    g.record(0.050)  # not slow, but the p95 of 4 is 150 ms
    assert g.slow_calls == 3 and g.tripped
    assert value(metrics, "sluice_guardrail_tripped") == 1
    assert value(metrics, "sluice_guardrail_p95_seconds") == pytest.approx(0.150)
    assert value(metrics, "sluice_guardrail_seconds") == pytest.approx(0.100)
    view = g.view()
    assert (view.tripped, view.samples, view.slow_calls) == (True, 4, 3)
    assert view.p95_ms == pytest.approx(150.0)


def test_recovery_needs_the_p95_under_the_recovery_share_of_the_guardrail() -> None:
    clock, metrics = FakeClock(), Metrics()
    g = guard(clock, metrics, recovery_ratio=0.8, window_calls=4)
    for _ in range(4):
        g.record(0.200)
    assert g.tripped
    for _ in range(4):  # under the guardrail, above 80 ms: hysteresis keeps it tripped
        g.record(0.090)
    assert g.tripped and g.view().p95_ms == pytest.approx(90.0)
    for _ in range(4):
        g.record(0.070)
    assert not g.tripped
    assert value(metrics, "sluice_guardrail_tripped") == 0
    g.record(0.095)  # back over 80 ms but under the guardrail: stays recovered
    assert not g.tripped


def test_a_tripped_version_gets_one_probe_call_per_interval() -> None:
    clock, metrics = FakeClock(), Metrics()
    g = guard(clock, metrics, probe_interval_s=5.0)
    assert not g.gives_way()  # not tripped: every call may go to it
    for _ in range(4):
        g.record(0.300)
    assert g.tripped
    assert [g.gives_way() for _ in range(3)] == [True, True, True]  # just tripped
    clock.advance(5)
    assert [g.gives_way() for _ in range(3)] == [False, True, True]  # one probe
    clock.advance(4.9)
    assert g.gives_way()
    clock.advance(0.1)
    assert not g.gives_way()


def test_probe_calls_alone_bring_a_recovered_version_back() -> None:
    clock, metrics = FakeClock(), Metrics()
    g = guard(clock, metrics, window_s=40.0, probe_interval_s=5.0, min_samples=4)
    for _ in range(8):
        g.record(0.300)
    assert g.tripped
    probes = 0
    while g.tripped:  # only the probe calls reach it: the slow samples age out
        clock.advance(5)
        assert not g.gives_way()
        g.record(0.010)
        probes += 1
        assert probes < 20
    # The slow samples leave the 40 s window after 8 probes; 4 fast ones are then enough.
    assert probes == 8


def test_trip_and_recovery_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics = FakeClock(), Metrics()
    g = guard(clock, metrics, window_calls=4)
    with caplog.at_level(logging.INFO, logger="sluice.routing.guardrail"):
        for _ in range(10):
            g.record(0.200)
        for _ in range(10):
            g.record(0.010)
    fields = [getattr(r, "sluice_fields", {}) for r in caplog.records]
    outcomes = [f.get("outcome") for f in fields]
    assert outcomes == ["guardrail_tripped", "guardrail_recovered"]
    assert fields[0] | {"p95_ms": 0} == {
        "model": "m",
        "version": "1",
        "backend": "onnxruntime",
        "outcome": "guardrail_tripped",
        "p95_ms": 0,
        "guardrail_ms": 100.0,
    }
    assert fields[0]["p95_ms"] == pytest.approx(200.0)
    assert fields[1]["p95_ms"] == pytest.approx(10.0)


def test_a_changed_guardrail_starts_afresh_and_none_removes_it() -> None:
    clock, metrics = FakeClock(), Metrics()
    settings = GuardrailSettings(min_samples=2, window_calls=4, window_s=10, probe_interval_s=1)
    guards = Guardrails(settings, metrics=metrics, clock=clock)
    first = guards.get(100.0, *KEY)
    assert first is not None
    for _ in range(2):
        first.record(0.5)
    assert guards.get(100.0, *KEY) is first and first.tripped  # same guardrail: kept
    second = guards.get(50.0, *KEY)
    assert second is not None and second is not first and not second.tripped
    assert guards.get(None, *KEY) is None
    assert guards.peek(*KEY) is None


def test_settings_refuse_a_window_the_probes_could_never_fill() -> None:
    with pytest.raises(ValidationError, match="probe calls alone"):
        GuardrailSettings(window_s=10, probe_interval_s=1, min_samples=20)
    with pytest.raises(ValidationError, match="window_calls"):
        GuardrailSettings(window_calls=5, min_samples=20)
    assert Settings().guardrail == GuardrailSettings()


# -- over a real server ----------------------------------------------------------------------

GUARDRAIL_MS = 200
SLOW_MS = 250
SERVER_SETTINGS = {
    "guardrail": {"min_samples": 5, "window_calls": 20, "window_s": 60.0, "probe_interval_s": 10.0}
}


class ShiftedClock:
    """The real monotonic clock, moved ahead by hand between calls (no call is in flight
    when it jumps, so no deadline is cut short)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def primary_config(*, slow: bool) -> str:
    fault = f"faults: {{mode: slow, delay_ms: {SLOW_MS}}}\n" if slow else ""
    return f"latency_guardrail_ms: {GUARDRAIL_MS}\n{fault}fallbacks: [{{model: simple_b}}]\n"


@pytest.fixture
async def channel_to() -> AsyncIterator[object]:
    channels: list[grpc.aio.Channel] = []

    def make(server: RunningServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(server.address)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


async def served_by(stub: infer_grpc.GRPCInferenceServiceStub) -> str:
    _, trailers = await call(stub, "simple")
    return str(trailers["x-sluice-served-by"])


async def listed(models: pb_grpc.ModelServiceStub, name: str) -> pb.ModelVersionStatus:
    listing = await models.ListModels(pb.ListModelsRequest())
    (row,) = [m for m in listing.models if m.name == name]
    return row


async def guardrail_of(models: pb_grpc.ModelServiceStub, name: str) -> pb.LatencyGuardrailStatus:
    row = await listed(models, name)
    assert row.HasField("latency_guardrail")
    return row.latency_guardrail


PRIMARY = "simple/1/onnxruntime"
BACKUP = "simple_b/1/onnxruntime"


async def test_slow_primary_gives_way_to_its_fallback_and_comes_back_when_fast(
    start_server: StartServer,
    example_repository: Path,
    channel_to: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ShiftedClock()
    repository = with_backup(example_repository, primary_config(slow=True))
    server = await start_server(repository=repository, clock=clock, **SERVER_SETTINGS)
    channel = channel_to(server)  # type: ignore[operator]
    stub, models = infer_grpc.GRPCInferenceServiceStub(channel), pb_grpc.ModelServiceStub(channel)
    labels = {"model": "simple", "version": "1", "backend": "onnxruntime"}

    with caplog.at_level(logging.INFO, logger="sluice.routing.guardrail"):
        # Five slow answers (min_samples) from the primary trip it...
        assert [await served_by(stub) for _ in range(5)] == [PRIMARY] * 5
        status = await guardrail_of(models, "simple")
        assert status.tripped and status.slow_calls == 5 and status.samples == 5
        assert status.guardrail_ms == GUARDRAIL_MS and status.p95_ms >= SLOW_MS
        assert sample(server, "sluice_guardrail_tripped", labels) == 1
        assert sample(server, "sluice_guardrail_slow_calls_total", labels) == 5
        # ...a soft failure: the breaker is untouched.
        assert sample(server, "sluice_breaker_state", labels) == 0
        # Now the fallback answers, and says it is one.
        for _ in range(4):
            _, trailers = await call(stub, "simple")
            assert trailers["x-sluice-served-by"] == BACKUP
            assert trailers["x-sluice-fallback"] == "true"
        assert not (await listed(models, "simple_b")).HasField("latency_guardrail")

        # The slowness ends (the same guardrail, no fault): the state is kept over the reload.
        (repository / "simple" / "config.yaml").write_text(primary_config(slow=False))
        await models.LoadModel(pb.LoadModelRequest(model_name="simple"))
        assert (await guardrail_of(models, "simple")).tripped
        assert await served_by(stub) == BACKUP
        # One probe call per interval reaches it; once the slow calls left the window and
        # five fast probes filled it, it recovers.
        clock.advance(60)
        served = []
        for _ in range(5):
            served.append(await served_by(stub))  # the probe
            served.append(await served_by(stub))  # the others still prefer the fallback
            clock.advance(10)
        assert served == [PRIMARY, BACKUP] * 4 + [PRIMARY, PRIMARY]
        status = await guardrail_of(models, "simple")
        assert not status.tripped and status.p95_ms < 0.8 * GUARDRAIL_MS
        assert status.slow_calls == 5
        assert sample(server, "sluice_guardrail_tripped", labels) == 0
        assert [await served_by(stub) for _ in range(3)] == [PRIMARY] * 3

    transitions = [r for r in caplog.records if r.name == "sluice.routing.guardrail"]
    outcomes = [getattr(r, "sluice_fields", {}).get("outcome") for r in transitions]
    assert outcomes == ["guardrail_tripped", "guardrail_recovered"]


async def test_a_tripped_version_with_no_other_candidate_still_serves(
    start_server: StartServer, example_repository: Path, channel_to: object
) -> None:
    config = f"latency_guardrail_ms: {GUARDRAIL_MS}\nfaults: {{mode: slow, delay_ms: {SLOW_MS}}}\n"
    (example_repository / "simple" / "config.yaml").write_text(config)
    server = await start_server(repository=example_repository, **SERVER_SETTINGS)
    channel = channel_to(server)  # type: ignore[operator]
    stub, models = infer_grpc.GRPCInferenceServiceStub(channel), pb_grpc.ModelServiceStub(channel)
    assert [await served_by(stub) for _ in range(6)] == [PRIMARY] * 6
    status = await guardrail_of(models, "simple")
    assert status.tripped and status.slow_calls == 6
    async with AsyncClient(channel) as client:  # the typed client shows it too
        (row,) = [m for m in await client.list_models() if m.name == "simple"]
    assert row.latency_guardrail is not None
    assert row.latency_guardrail.tripped and row.latency_guardrail.slow_calls == 6
    assert row.latency_guardrail.guardrail_ms == GUARDRAIL_MS


async def test_a_failing_fallback_hands_the_call_back_to_the_tripped_version(
    start_server: StartServer, example_repository: Path, channel_to: object
) -> None:
    repository = with_backup(
        example_repository, primary_config(slow=True), "faults: {mode: fail}\n"
    )
    server = await start_server(
        repository=repository,
        breaker={"fail_max": 2},
        # No retry budget at all: handing the call back is no retry, it is never refused.
        retry={"budget_ratio": 0, "budget_min_retries": 0},
        **SERVER_SETTINGS,
    )
    stub = infer_grpc.GRPCInferenceServiceStub(channel_to(server))  # type: ignore[operator]
    assert [await served_by(stub) for _ in range(5)] == [PRIMARY] * 5  # tripped now
    attempts = []
    for _ in range(4):
        response, trailers = await call(stub, "simple")
        assert trailers["x-sluice-served-by"] == PRIMARY
        attempts.append(response.parameters["sluice_attempts"].int64_param)
    # The fallback went first and failed (twice, opening its breaker); after that it is
    # passed over, and the tripped primary answers every call at its first attempt.
    assert attempts == [2, 2, 1, 1]
    backup = {"model": "simple_b", "version": "1", "backend": "onnxruntime"}
    assert sample(server, "sluice_breaker_state", backup) == 2


async def test_a_generation_model_slow_to_its_first_token_gives_way(
    start_server: StartServer, example_repository: Path, channel_to: object
) -> None:
    slow = example_repository / "slow_llama"
    shutil.copytree(example_repository / "tiny_llama", slow)
    (slow / "config.yaml").write_text(
        f"latency_guardrail_ms: {GUARDRAIL_MS}\nfaults: {{mode: slow, delay_ms: {SLOW_MS}}}\n"
        "fallbacks: [{model: tiny_llama}]\n"
    )
    server = await start_server(repository=example_repository, **SERVER_SETTINGS)
    channel = channel_to(server)  # type: ignore[operator]
    stub, models = gen_grpc.GenerationServiceStub(channel), pb_grpc.ModelServiceStub(channel)
    request = gen.GenerateRequest(
        model_name="slow_llama", prompt="hello", parameters=gen.SamplingParameters(max_new_tokens=2)
    )
    for _ in range(5):  # each first token is late: five of them trip it
        chunks = [chunk async for chunk in stub.Generate(request)]
        assert {c.model_name for c in chunks} == {"slow_llama"}
    status = await guardrail_of(models, "slow_llama")
    assert status.tripped and status.slow_calls == 5
    chunks = [chunk async for chunk in stub.Generate(request)]
    assert {c.model_name for c in chunks} == {"tiny_llama"}
    assert chunks[0].fallback_reason == "model 'slow_llama' is over its latency guardrail"
