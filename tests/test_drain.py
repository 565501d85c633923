"""SIGTERM under load, with a real process and a real signal, counting every call."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT

LISTENING = re.compile(rb"gRPC listening on [\d.]+:(\d+)")
METRICS_URL = re.compile(r"metrics on (http://\S+/metrics)")
WORKERS = 12


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
    return root


async def start_process(repository: Path) -> tuple[asyncio.subprocess.Process, int, list[bytes]]:
    env = {**os.environ, "SLUICE_DRAIN_GRACE_S": "20", "SLUICE_METRICS_PORT": "0"}
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


async def test_sigterm_drains_in_flight_calls_and_exits_zero(slow_repository: Path) -> None:
    proc, port, log = await start_process(slow_repository)
    reader = asyncio.create_task(keep_reading(proc, log))
    outcomes: Counter[str] = Counter()
    spanning_ok = 0  # calls that started before SIGTERM and finished after it
    signalled_at: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
            pass  # NOT_SERVING until the models have loaded
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = infer_request()

        async def worker() -> None:
            nonlocal spanning_ok
            while True:
                started = time.monotonic()
                try:
                    await stub.ModelInfer(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1
                    return  # refused: a real client would go to another replica
                outcomes["OK"] += 1
                if signalled_at and started < signalled_at[0]:
                    spanning_ok += 1

        workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
        while outcomes["OK"] < 100:
            await asyncio.sleep(0.01)
        scraped = await asyncio.to_thread(scrape, b"".join(log).decode())
        assert 'sluice_requests_total{code="OK",method="ModelInfer",model="mlp"}' in scraped
        assert "sluice_batch_size_bucket" in scraped
        signalled_at.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        after = await watch.read()
        assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        watch.cancel()
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    await reader
    text = b"".join(log).decode()
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, (outcomes, text)
    assert outcomes["UNAVAILABLE"] == WORKERS  # every worker was refused in the end
    assert spanning_ok >= 1, outcomes  # calls in flight at SIGTERM completed
    assert "drained" in text
