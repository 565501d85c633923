"""``sluice serve`` says what it serves; start-up failures are clear and exit non-zero."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
from pathlib import Path

from sluice.repository import EXAMPLE_REPOSITORY
from sluice_client import AsyncClient
from tests.serve_process import serve_process


async def test_busy_port_is_a_clear_error_and_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sluice",
            "serve",
            "--grpc-port",
            str(port),
            "--metrics-port",
            "0",
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1 (grpc_port {port}" in stderr.decode()
    assert "Traceback" not in stderr.decode()


# -- the start-up summary ------------------------------------------------------------------


def broken_models(repository: Path) -> None:
    """Two models that cannot load: an unreadable ONNX file and an invalid config."""
    (repository / "garbled" / "1").mkdir(parents=True)
    (repository / "garbled" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    shutil.copytree(EXAMPLE_REPOSITORY / "simple", repository / "misconfigured")
    (repository / "misconfigured" / "config.yaml").write_text("max_batch_size: -3\n")


async def test_the_summary_names_what_serves_and_what_failed_and_why(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_REPOSITORY / "simple", tmp_path / "simple")
    broken_models(tmp_path)
    async with serve_process("--model-repository", tmp_path) as server:
        failed = (await server.wait_for(r'"not loaded: (.*)"')).group(1)
        serving = (await server.wait_for(r'"ready: serving (.*)"')).group(1)
        async with AsyncClient(await server.address()) as client:
            assert await client.health() == "SERVING"
        assert await server.stop() == 0
    assert serving == "simple (version 1)"
    garbled, misconfigured = failed.split("; ")
    assert garbled.startswith("garbled version 1: ") and "model.onnx" in garbled
    assert misconfigured.startswith("misconfigured: ") and "max_batch_size" in misconfigured


async def test_a_server_where_nothing_loaded_says_so_and_exits_1(tmp_path: Path) -> None:
    broken_models(tmp_path)
    async with serve_process("--model-repository", tmp_path) as server:
        assert await server.finish() == 1
    assert f"nothing to serve: none of the 2 model(s) in {tmp_path} loaded" in server.log
    assert "ready: serving" not in server.log and "Traceback" not in server.log


async def test_an_empty_repository_is_nothing_to_serve(tmp_path: Path) -> None:
    async with serve_process("--model-repository", tmp_path) as server:
        assert await server.finish() == 1
    assert f"nothing to serve: no model in {tmp_path} loaded" in server.log
