"""A private redis-server for tests that share state through Redis, stopped by the test."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.toolchains import missing


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_redis(directory: Path, *, host: str = "127.0.0.1") -> Iterator[str]:
    """A redis-server bound to ``host`` on a free port: its URL while it runs."""
    if importlib.util.find_spec("redis") is None:
        missing("needs the redis package (pip install -e '.[test]')")
    binary = shutil.which("redis-server")
    if binary is None:
        missing("needs redis-server (Debian: apt-get install redis-server)")
    port = free_port(host)
    command = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(directory), "--logfile", "", "--protected-mode", "no"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        assert server.stdout is not None
        try:
            if not any("Ready to accept connections" in line for line in server.stdout):
                pytest.fail(f"redis-server on {host}:{port} exited with {server.wait()}")
            # Keep reading its log so a chatty server never blocks on a full pipe.
            threading.Thread(target=server.stdout.read, daemon=True).start()
            yield f"redis://{host}:{port}/0"
        finally:
            server.terminate()
            server.wait(timeout=30)
