"""``sluice serve`` start-up failures are clear and exit non-zero."""

from __future__ import annotations

import asyncio
import socket
import sys


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
