"""A real ``sluice serve`` process on 127.0.0.1, port 0, whose log is read as it is written.

The process is killed when the ``serve_process`` block ends, so no server outlives its test.
With ``SLUICE_TEST_WORKERS=N`` in the environment, every such server runs with
``--workers N`` (transport processes in front of the engine) unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"gRPC listening on [\d.]+:(\d+)")
#: ``python -m sluice`` with the interpreter running the tests.
THIS_PYTHON = (sys.executable, "-m", "sluice")


def workers_env() -> dict[str, str]:
    """``SLUICE_WORKERS`` as ``SLUICE_TEST_WORKERS`` asks (nothing when it is not set)."""
    workers = os.environ.get("SLUICE_TEST_WORKERS")
    return {"SLUICE_WORKERS": workers} if workers else {}


@dataclass(eq=False)
class ServeProcess:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, limit_s: float = 120.0) -> re.Match[str]:
        """Read the log until a line matches ``pattern`` (fails if the process ends first)."""
        wanted = re.compile(pattern)
        for line in self.lines:
            if found := wanted.search(line):
                return found
        assert self.proc.stderr is not None
        async with asyncio.timeout(limit_s):
            while line := (await self.proc.stderr.readline()).decode(errors="replace"):
                self.lines.append(line)
                if found := wanted.search(line):
                    return found
        raise AssertionError(f"`sluice serve` ended without logging {pattern!r}:\n{self.log}")

    async def address(self) -> str:
        return f"127.0.0.1:{(await self.wait_for(LISTENING.pattern)).group(1)}"

    async def finish(self, limit_s: float = 120.0) -> int:
        """Read the rest of the log and wait for the process to exit; its status."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(limit_s):
            while line := (await self.proc.stderr.readline()).decode(errors="replace"):
                self.lines.append(line)
            return await self.proc.wait()

    async def stop(self, limit_s: float = 120.0) -> int:
        """SIGTERM (a drain), then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.finish(limit_s)


@contextlib.asynccontextmanager
async def serve_process(
    *args: str | os.PathLike[str],
    command: Sequence[str | os.PathLike[str]] = THIS_PYTHON,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    unset: Sequence[str] = (),
) -> AsyncIterator[ServeProcess]:
    """``<command> serve --grpc-port 0 --metrics-port 0 <args>``, JSON logs unless ``env``
    says otherwise, without the environment variables named in ``unset``; killed at the
    end of the block if it is still running."""
    environment = {"SLUICE_LOG_FORMAT": "json", **workers_env(), **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        *command,
        "serve",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            name: value
            for name, value in {**os.environ, **environment}.items()
            if name not in unset
        },
        cwd=cwd,
    )
    try:
        yield ServeProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
