"""Remote candidates against servers in other processes: PyTriton (Triton's own gRPC front
end, ``bench/pytriton_server.py``) and a second ``sluice serve`` process. The local server's
model always fails; its fallback is the same ONNX model on the other server, and every answer
is checked against onnxruntime running the file here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests import toolchains
from tests.conftest import REPO_ROOT, RunningServer, StartServer
from tests.models import make_mlp, sample, write_model_folder, write_onnx
from tests.observability.collector import Collector
from tests.serve_process import serve_process

MODEL = "mlp"
SERVER_SPAN = "inference.GRPCInferenceService/ModelInfer"
#: Longest wait for a peer to start and say its model is ready (PyTriton starts Triton's
#: server binary and a Python backend; slow on a busy machine, but bounded).
START_LIMIT_S = 180.0
CALL_TIMEOUT_S = 30.0


def free_port() -> int:
    """A port free right now on 127.0.0.1 (PyTriton takes ports, not port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return write_onnx(make_mlp(), tmp_path / "mlp.onnx")


def failing_local(tmp_path: Path, onnx_file: Path, remote: str) -> Path:
    """``mlp`` here always fails; its fallback is ``mlp`` on the server at ``remote``."""
    repository = tmp_path / "local"
    config = f"faults: {{mode: fail}}\nfallbacks: [{{endpoint: '{remote}', model: {MODEL}}}]\n"
    write_model_folder(repository, MODEL, {"model.onnx": onnx_file}, config=config)
    return repository


def request(rows: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(rows.shape)
            )
        ],
        raw_input_contents=[rows.tobytes()],
    )


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.raw_output_contents) == len(response.outputs), response
    return {
        tensor.name: np.frombuffer(raw, np.float32).reshape(list(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def remote_ready(local: RunningServer, endpoint: str) -> float:
    labels = {"endpoint": endpoint, "model": MODEL, "version": ""}
    return local.metrics.registry.get_sample_value("sluice_remote_ready", labels) or 0.0


async def probed_ready(local: RunningServer, endpoint: str) -> None:
    """Probe until the local server's ``ModelReady`` probe finds the remote ready (bounded)."""
    async with asyncio.timeout(START_LIMIT_S):
        while True:
            await local.server.prober.probe_all()
            if remote_ready(local, endpoint) == 1:
                return
            await asyncio.sleep(0.5)


async def calls_are_served_by(
    local: RunningServer, endpoint: str, onnx_file: Path, request_ids: list[str]
) -> None:
    """Each call fails over to ``endpoint``, which answers what onnxruntime answers here."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    async with grpc.aio.insecure_channel(local.address) as channel:
        client = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for number, request_id in enumerate(request_ids):
            rows = sample(number + 1, seed=number)
            call = client.ModelInfer(
                request(rows), metadata=(("x-request-id", request_id),), timeout=CALL_TIMEOUT_S
            )
            response = await call
            trailers = dict(await call.trailing_metadata() or ())
            assert trailers["x-sluice-endpoint"] == endpoint
            assert trailers["x-sluice-served-by"].endswith("/remote")
            assert trailers["x-sluice-fallback"] == "true"
            assert response.parameters["sluice_endpoint"].string_param == endpoint
            got = outputs(response)
            expected = dict(
                zip(
                    [o.name for o in session.get_outputs()],
                    session.run(None, {"input": rows}),
                    strict=True,
                )
            )
            assert set(got) == set(expected)
            for name, values in expected.items():
                np.testing.assert_allclose(got[name], values, rtol=1e-5, atol=1e-6)
    labels = {"endpoint": endpoint, "model": MODEL, "code": "OK"}
    served = local.metrics.registry.get_sample_value("sluice_remote_requests_total", labels)
    assert served == len(request_ids)


@dataclass
class PyTriton:
    proc: asyncio.subprocess.Process
    log: Path
    grpc_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def listening(self) -> None:
        """Wait for the line ``bench/pytriton_server.py`` prints once Triton is up."""
        async with asyncio.timeout(START_LIMIT_S):
            while f"gRPC listening on {self.address}" not in self.text():
                if self.proc.returncode is not None:
                    raise AssertionError(f"PyTriton ended at start:\n{self.text()}")
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def pytriton(python: Path, onnx_file: Path, log: Path) -> AsyncIterator[PyTriton]:
    """``bench/pytriton_server.py`` serving ``onnx_file`` as ``mlp`` on free ports, in its own
    process group: SIGTERM at the end (PyTriton stops its Triton server), and if it has not
    exited within a minute the whole group is killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The Python backend's stub links libpython and must find the toolchain's own.
    done = await asyncio.create_subprocess_exec(
        str(python),
        "-c",
        "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')",
        stdout=asyncio.subprocess.PIPE,
    )
    libdir = (await asyncio.wait_for(done.communicate(), 60))[0].decode().strip()
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p
        )
    grpc_port = free_port()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(python),
            str(REPO_ROOT / "bench" / "pytriton_server.py"),
            "--model-path",
            str(onnx_file),
            "--model-name",
            MODEL,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(free_port()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    # Where bench/pytriton_server.py puts PyTriton's workspace (removed here if it is killed).
    workspace = Path(tempfile.gettempdir()) / f"bench-pytriton-{proc.pid}"
    try:
        yield PyTriton(proc, log, grpc_port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        if proc.returncode is None:
            await proc.wait()
        shutil.rmtree(workspace, ignore_errors=True)


@pytest.mark.toolchain("pytriton")
async def test_a_failing_model_falls_back_to_the_same_model_served_by_pytriton(
    start_server: StartServer, tmp_path: Path, onnx_file: Path
) -> None:
    python = toolchains.pytriton_python()
    assert python is not None
    async with pytriton(python, onnx_file, tmp_path / "pytriton.log") as peer:
        await peer.listening()
        local = await start_server(
            repository=failing_local(tmp_path, onnx_file, peer.address),
            probe={"interval_s": 0},
        )
        await probed_ready(local, peer.address)  # ModelReady, as PyTriton answers it
        await calls_are_served_by(local, peer.address, onnx_file, ["t-0", "t-1", "t-2"])


async def test_a_failing_model_falls_back_to_a_second_sluice_process(
    start_server: StartServer, tmp_path: Path, onnx_file: Path
) -> None:
    remote_repository = tmp_path / "remote"
    write_model_folder(remote_repository, MODEL, {"model.onnx": onnx_file})
    collector = await Collector().start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": "sluice-remote",
        }
        async with serve_process("--model-repository", remote_repository, env=env) as remote:
            endpoint = await remote.address()
            local = await start_server(
                repository=failing_local(tmp_path, onnx_file, endpoint), probe={"interval_s": 0}
            )
            await probed_ready(local, endpoint)
            ids = ["p-0", "p-1", "p-2"]
            await calls_are_served_by(local, endpoint, onnx_file, ids)
            assert await remote.stop() == 0, remote.log  # its drain flushes its spans
        served = {
            span.attributes.get("sluice.request_id")
            for span in collector.named(SERVER_SPAN)
            if span.service_name == "sluice-remote"
        }
        assert served == set(ids)  # the caller's request ids reached the other process
    finally:
        await collector.stop()
