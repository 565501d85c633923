"""SIGTERM under load, with a real process and a real signal, counting every call."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.repository import EXAMPLE_REPOSITORY
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import REPO_ROOT, StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository
from tests.observability.collector import Collector
from tests.serve_process import workers_env

LISTENING = re.compile(rb"gRPC listening on [\d.]+:(\d+)")
METRICS_URL = re.compile(r"metrics on (http://\S+/metrics)")
WORKERS = 12
STREAMS = 4


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark MLP: heavy enough that calls are in flight when the signal lands."""
    root = tmp_path_factory.mktemp("drain-models")
    (root / "mlp" / "1").mkdir(parents=True)
    import subprocess

    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "build_example_models.py"),
            "--bench-mlp",
            str(root / "mlp" / "1" / "model.onnx"),
            "--bench-only",
        ],
        check=True,
    )
    (root / "mlp" / "config.yaml").write_text("max_batch_size: 64\n")
    shutil.copytree(EXAMPLE_REPOSITORY / "tiny_llama", root / "tiny_llama")
    return root


async def start_process(
    repository: Path, extra_env: dict[str, str], processes: list[asyncio.subprocess.Process]
) -> tuple[asyncio.subprocess.Process, int, list[bytes]]:
    env = {
        **os.environ,
        "SLUICE_DRAIN_GRACE_S": "60",
        "SLUICE_METRICS_PORT": "0",
        **workers_env(),
        **extra_env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice",
        "serve",
        "--grpc-port",
        "0",
        "--model-repository",
        str(repository),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    processes.append(proc)
    assert proc.stderr is not None
    log: list[bytes] = []
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, b"".join(log).decode()
        log.append(line)
        if match := LISTENING.search(line):
            return proc, int(match.group(1)), log


async def keep_reading(proc: asyncio.subprocess.Process, log: list[bytes]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        log.append(line)


def scrape(log_text: str) -> str:
    match = METRICS_URL.search(log_text)
    assert match, log_text
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        return response.read().decode()


def infer_request() -> pb.ModelInferRequest:
    x = np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="mlp",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[64, 256])
        ],
        raw_input_contents=[x.tobytes()],
    )


class Tally:
    """Every call and stream the load generator made, and how each ended."""

    def __init__(self) -> None:
        self.unary: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()  # how each stream ended
        self.stream_responses = 0
        self.stream_requests = 0
        self.spanning_ok = 0  # unary calls that started before SIGTERM and finished after it
        self.generations: Counter[str] = Counter()  # how each Generate call ended
        self.spanning_generations = 0  # token streams running at SIGTERM that completed
        self.signalled_at: float | None = None

    def began_before_signal(self, started: float) -> bool:
        return self.signalled_at is not None and started < self.signalled_at


async def unary_worker(stub: pb_grpc.GRPCInferenceServiceStub, tally: Tally) -> None:
    request = infer_request()
    while True:
        started = time.monotonic()
        try:
            await stub.ModelInfer(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            tally.unary[exc.code().name] += 1
            return  # refused: a real client would go to another replica
        tally.unary["OK"] += 1
        if tally.began_before_signal(started):
            tally.spanning_ok += 1


async def stream_worker(stub: pb_grpc.GRPCInferenceServiceStub, tally: Tally) -> None:
    """One stream, one request at a time, until the server ends it."""
    sending: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
    stream = stub.ModelStreamInfer(feed(sending), timeout=60)
    try:
        while True:
            sending.put_nowait(infer_request())
            tally.stream_requests += 1
            response = await stream.read()
            assert response is not grpc.aio.EOF and not response.error_message, response
            tally.stream_responses += 1
    except grpc.aio.AioRpcError as exc:
        tally.streams[ended_with(exc)] += 1
        if exc.code() == grpc.StatusCode.UNAVAILABLE:  # as the server sent it
            assert "draining" in str(exc.details()), exc
    finally:
        sending.put_nowait(None)  # ends the request generator


def ended_with(exc: grpc.aio.AioRpcError) -> str:
    """The status a stream ended with, as the server set it. grpc's Python client reports
    INTERNAL ("Failed execute_batch" of a SendMessageOperation) instead of the server's
    status when the server ends a call while the client is still sending on it; the server
    ended it with UNAVAILABLE then (nothing else ends a call early here)."""
    debug = exc.debug_error_string() or ""
    if exc.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in debug:
        return "UNAVAILABLE"
    return exc.code().name


async def generation_worker(stub: gen_grpc.GenerationServiceStub, tally: Tally) -> None:
    """Token streams back to back; each either completes with its final chunk or is refused
    before it starts."""
    request = gen.GenerateRequest(
        model_name="tiny_llama",
        prompt="Once upon a time",
        parameters=gen.SamplingParameters(max_new_tokens=120, temperature=0.8, seed=1),
    )
    while True:
        started = time.monotonic()
        chunks = []
        try:
            async for chunk in stub.Generate(request, timeout=60):
                chunks.append(chunk)
        except grpc.aio.AioRpcError as exc:
            assert not chunks, f"a started token stream was cut: {exc}"
            tally.generations[exc.code().name] += 1
            return
        last = chunks[-1]
        assert last.finish_reason != gen.FINISH_REASON_UNSPECIFIED, last
        assert last.usage.completion_tokens == len(chunks)
        tally.generations["OK"] += 1
        if tally.began_before_signal(started):
            tally.spanning_generations += 1


async def test_sigterm_drains_in_flight_calls_and_streams_and_exits_zero(
    slow_repository: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    collector = await Collector().start()
    proc, port, log = await start_process(
        slow_repository,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",  # spans leave only when the drain flushes
            "OTEL_BSP_MAX_QUEUE_SIZE": "1000000",
            "OTEL_SERVICE_NAME": "sluice-drain",
            # New calls are refused as soon as health says NOT_SERVING (the notice period,
            # when they are still served, has its own test).
            "SLUICE_DRAIN_NOTICE_S": "0",
        },
        processes,
    )
    reader = asyncio.create_task(keep_reading(proc, log))
    tally = Tally()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
            pass  # NOT_SERVING until the models have loaded
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        workers = [asyncio.create_task(unary_worker(stub, tally)) for _ in range(WORKERS)]
        streams = [asyncio.create_task(stream_worker(stub, tally)) for _ in range(STREAMS)]
        generator = gen_grpc.GenerationServiceStub(channel)
        token_streams = [
            asyncio.create_task(generation_worker(generator, tally)) for _ in range(STREAMS)
        ]
        while tally.unary["OK"] < 100 or tally.stream_responses < 20:
            await asyncio.sleep(0.01)
        scraped = await asyncio.to_thread(scrape, b"".join(log).decode())
        assert 'sluice_requests_total{code="OK",method="ModelInfer",model="mlp"}' in scraped
        assert "sluice_batch_size_bucket" in scraped
        open_streams = re.search(r"^sluice_open_streams (\S+)$", scraped, re.MULTILINE)
        assert open_streams, scraped
        # The ModelStreamInfer streams, and the token streams that are open at the moment.
        assert STREAMS <= float(open_streams.group(1)) <= 2 * STREAMS, open_streams.group(0)
        tally.signalled_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        after = await watch.read()
        assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # new streams are refused
            await stub.ModelStreamInfer(iter([infer_request()])).read()
        assert ended_with(refused.value) == "UNAVAILABLE", refused.value
        await asyncio.wait_for(asyncio.gather(*workers, *streams, *token_streams), 60)
        with pytest.raises(grpc.aio.AioRpcError) as watch_end:  # watchers do not hold it
            await asyncio.wait_for(watch.read(), 30)
        assert watch_end.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(watch_end.value.details())
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    await reader
    await collector.stop()
    text = b"".join(log).decode()

    # Every call and stream is accounted for, and none was cut.
    assert set(tally.unary) <= {"OK", "UNAVAILABLE"}, (tally.unary, text)
    assert tally.unary["UNAVAILABLE"] == WORKERS  # every worker was refused in the end
    assert tally.spanning_ok >= 1, tally.unary  # calls in flight at SIGTERM completed
    problems = [line for line in text.splitlines() if '"level": "ERROR"' in line]
    assert tally.streams == Counter({"UNAVAILABLE": STREAMS}), (tally.streams, problems)
    # A stream's requests were all answered, except at most the one it was sending when
    # the server stopped reading (the UNAVAILABLE status tells the client to resend it).
    assert tally.stream_requests - STREAMS <= tally.stream_responses <= tally.stream_requests
    # Token streams running at SIGTERM finished with their last chunk; new ones were refused.
    assert tally.generations["UNAVAILABLE"] == STREAMS, tally.generations
    assert set(tally.generations) == {"OK", "UNAVAILABLE"}, tally.generations
    assert tally.spanning_generations >= 1, tally.generations

    # Logs are JSON lines, and the drain ran in order, ending with the telemetry flush.
    entries = [json.loads(line) for line in text.splitlines()]
    messages = [str(e["message"]) for e in entries]
    assert all({"timestamp", "level", "message"} <= e.keys() for e in entries)
    order = ["draining", "unloading models", "drained", "stopped"]
    positions = [next(i for i, m in enumerate(messages) if o in m) for o in order]
    assert positions == sorted(positions), messages

    # Every successful call's span reached the collector in the final flush.
    infer_ok = [
        s
        for s in collector.named("inference.GRPCInferenceService/ModelInfer")
        if s.attributes["rpc.grpc.status_code"] == 0
    ]
    assert len(infer_ok) == tally.unary["OK"]
    assert {s.service_name for s in infer_ok} == {"sluice-drain"}
    opened = collector.named("inference.GRPCInferenceService/ModelStreamInfer")
    assert len(opened) == STREAMS + 1  # the refused one too
    assert len(collector.named("sluice.attempt")) >= tally.unary["OK"] + tally.stream_responses


# -- in process: streams and health watchers during a drain ---------------------------------


def fake_request(value: float) -> pb.ModelInferRequest:
    x = np.full((1, 4), value, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="fake",
        id=f"r{value:g}",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )


async def feed(queue: asyncio.Queue[pb.ModelInferRequest | None]) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


async def test_a_drain_lets_open_streams_finish_then_ends_them_and_the_watchers(
    start_server: StartServer, tmp_path: Path
) -> None:
    behaviour = Behaviour()
    running = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(behaviour),
    )
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        sending: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        stream = stub.ModelStreamInfer(feed(sending))
        behaviour.hold()
        sending.put_nowait(fake_request(1))
        sending.put_nowait(fake_request(2))
        await behaviour.started.wait()
        async with asyncio.timeout(10):  # the server has read (and admitted) both requests
            while running.server.admission.inflight < 2:
                await asyncio.sleep(0)

        drain = asyncio.create_task(running.server.drain(grace_s=60, quiet_s=0))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # no new streams
            await stub.ModelStreamInfer(iter([fake_request(3)])).read()
        assert ended_with(refused.value) == "UNAVAILABLE", refused.value
        assert not drain.done()  # held by the open stream's work

        behaviour.release()
        answered = [(await stream.read()).infer_response.id for _ in range(2)]
        assert answered == ["r1", "r2"]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in str(ended.value.details())
        assert "request id" in str(ended.value.details())
        sending.put_nowait(None)

        async with asyncio.timeout(10):  # far less than the 60 s grace: nothing holds it
            await drain
        with pytest.raises(grpc.aio.AioRpcError) as watch_end:
            await watch.read()
        assert watch_end.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(watch_end.value.details())
    assert running.service.model_names() == []  # unloaded last


async def test_a_stream_the_client_already_closed_just_finishes_during_a_drain(
    start_server: StartServer, tmp_path: Path
) -> None:
    behaviour = Behaviour()
    running = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(behaviour),
    )
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        behaviour.hold()
        stream = stub.ModelStreamInfer(iter([fake_request(1)]))  # half-closes after one
        await behaviour.started.wait()
        # The half-close travels after the request; nothing on the server shows when it has
        # been read, so give it a moment to arrive before the drain begins.
        await asyncio.sleep(0.2)
        drain = asyncio.create_task(running.server.drain(grace_s=60, quiet_s=0))
        while not running.server.admission.inflight or drain.done():
            await asyncio.sleep(0)
        behaviour.release()
        responses = [r async for r in stream]
        assert [r.infer_response.id for r in responses] == ["r1"]
        assert await stream.code() == grpc.StatusCode.OK
        async with asyncio.timeout(10):
            await drain


# -- a hung backend cannot stretch the drain -----------------------------------------------

GRACE_S = 2.0
UNLOAD_S = 2.0
EXIT_SLACK_S = 5.0  # the interpreter's own start-to-exit costs, on a loaded machine


@pytest.fixture
def hung_repository(tmp_path: Path) -> Path:
    """The example ``simple`` model with a backend that never answers."""
    root = tmp_path / "models"
    shutil.copytree(EXAMPLE_REPOSITORY / "simple", root / "simple")
    (root / "simple" / "config.yaml").write_text("faults: {mode: hang}\n")
    return root


async def test_a_hung_backend_cannot_keep_the_process_past_its_drain_allowance(
    hung_repository: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    env = {
        "SLUICE_DRAIN_GRACE_S": str(GRACE_S),
        "SLUICE_DRAIN_UNLOAD_S": str(UNLOAD_S),
        "SLUICE_PROBE__INTERVAL_S": "0",
        "SLUICE_EXECUTOR__MAX_BATCH_EXECUTION_S": "120",
    }
    proc, port, log = await start_process(hung_repository, env, processes)
    reader = asyncio.create_task(keep_reading(proc, log))
    data = np.ones((1, 16), dtype=np.int32).tobytes()
    request = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[data, data],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
            pass
        watch.cancel()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        hung = asyncio.ensure_future(stub.ModelInfer(request, timeout=60))
        async with asyncio.timeout(30):  # the call is in flight, on the hung backend
            while (
                "sluice_model_inflight_requests{"
                not in (metrics := await asyncio.to_thread(scrape, b"".join(log).decode()))
                or "sluice_inflight_requests 1.0" not in metrics
            ):
                await asyncio.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await hung
        code = await asyncio.wait_for(proc.wait(), GRACE_S + UNLOAD_S + EXIT_SLACK_S)
        took = time.monotonic() - signalled
    await reader
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert "drain grace ended" in str(info.value.details())
    assert code == 0, b"".join(log).decode()[-3000:]
    assert took < GRACE_S + UNLOAD_S + EXIT_SLACK_S


async def test_during_the_drain_notice_health_says_not_serving_and_calls_are_still_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    running = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(Behaviour()),
    )
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        drain = asyncio.create_task(running.server.drain(30.0, 2.0, 1.0, notice_s=2.0))
        # Health turns first: a client watching it moves its calls away...
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ...while a call that still arrives is served, not refused.
        reply = await stub.ModelInfer(fake_request(1), timeout=10)
        assert reply.model_name == "fake"
        # Once the notice is over, new calls are refused with UNAVAILABLE.
        async with asyncio.timeout(30):
            while True:
                try:
                    await stub.ModelInfer(fake_request(2), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert "shutting down" in str(exc.details())
                    break
                await asyncio.sleep(0.05)
        await drain
