"""``workers.child.Child``: a process the engine starts and watches from its event loop,
on asyncio's loop and on uvloop, with a pidfd or, where there is none, a waiting thread."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sluice.eventloop import loop_factory
from sluice.workers import child as child_module
from sluice.workers.child import Child

ECHO_UNTIL_STOP = (
    "import sys\n"
    "print('port 1234', flush=True)\n"
    "line = sys.stdin.readline()\n"
    "sys.exit(3 if line.startswith('stop') else 4)\n"
)


async def _lifecycle() -> None:
    child = await Child.start([sys.executable, "-c", ECHO_UNTIL_STOP], os.environ)
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"port 1234\n"
    assert child.returncode is None
    child.write("stop 1.0\n")
    assert await asyncio.wait_for(child.wait(), 30) == 3
    assert child.returncode == 3
    child.write("stop 1.0\n")  # gone: ignored
    child.kill()  # gone: ignored

    sleeper = await Child.start([sys.executable, "-c", "import time; time.sleep(60)"], os.environ)
    sleeper.kill()
    assert await asyncio.wait_for(sleeper.wait(), 30) == -signal.SIGKILL

    # Reaped as it ends, whether or not anyone waits: no zombie is left behind (Popen sets
    # returncode only once it has reaped the process, and nobody here waits for it).
    quick = await Child.start([sys.executable, "-c", "pass"], os.environ)
    for _ in range(300):
        if quick.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert quick.returncode == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_is_started_read_told_to_stop_killed_and_reaped(loop: str) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:  # type: ignore[arg-type]
        runner.run(_lifecycle())


@pytest.fixture
def no_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.pidfd_open`` fails, as on kernels before 5.3 or in a sandbox that refuses it."""

    def refused(pid: int) -> int:
        raise OSError("no pidfd here")

    opener: Callable[[int], int] = refused
    monkeypatch.setattr(os, "pidfd_open", opener)


@pytest.mark.usefixtures("no_pidfd")
def test_without_a_pidfd_a_thread_waits_for_the_child() -> None:
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        runner.run(_lifecycle())


async def _children_leave_the_default_executor_free() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    sleepers = [
        await Child.start([sys.executable, "-c", "import time; time.sleep(60)"], os.environ)
        for _ in range(3)
    ]
    # Each is waited for by a thread of its own; the server's own work still gets the
    # executor's only thread.
    waiting = {thread.name for thread in threading.enumerate()}
    assert {f"sluice-reap-{sleeper.pid}" for sleeper in sleepers} <= waiting
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 10) == 7
    for sleeper in sleepers:
        sleeper.kill()
    for sleeper in sleepers:
        assert await asyncio.wait_for(sleeper.wait(), 30) == -signal.SIGKILL


@pytest.mark.usefixtures("no_pidfd")
def test_without_a_pidfd_the_waiting_threads_are_not_the_loops_executor() -> None:
    """Three children with no pidfd, a default executor of one thread: the executor stays
    free for the server's calls, and every child is still reaped."""

    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        runner.run(_children_leave_the_default_executor_free())


def test_a_child_whose_start_is_cancelled_is_killed_and_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled between the process starting and its pipe being watched (the server
    stopping while it restarts a transport): nobody would ever watch it, so it is killed."""
    started: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(child_module.subprocess, "Popen", Recorded)

    async def cancelled(*args: object) -> object:
        raise asyncio.CancelledError

    async def start() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "connect_read_pipe", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await Child.start([sys.executable, "-c", "import time; time.sleep(60)"], os.environ)

    with asyncio.Runner(loop_factory=loop_factory("asyncio")) as runner:
        runner.run(start())
    (popen,) = started
    deadline = time.monotonic() + 30
    while popen.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the reaping thread sets it
    assert popen.returncode == -signal.SIGKILL
