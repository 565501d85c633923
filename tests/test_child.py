"""``workers.child.Child``: a process the engine starts and watches from its event loop,
on asyncio's loop and on uvloop, with a pidfd or, where there is none, a waiting thread."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

import pytest

from sluice.eventloop import loop_factory
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

    # Reaped as it ends, whether or not anyone waits: no zombie is left behind.
    quick = await Child.start([sys.executable, "-c", "pass"], os.environ)
    for _ in range(300):
        if quick.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert quick.returncode == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(quick.pid, os.WNOHANG)  # noqa: ASYNC222  # WNOHANG: never blocks


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_is_started_read_told_to_stop_killed_and_reaped(loop: str) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:  # type: ignore[arg-type]
        runner.run(_lifecycle())


def test_without_a_pidfd_a_thread_waits_for_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError("no pidfd here")

    opener: Callable[[int], int] = no_pidfd
    monkeypatch.setattr(os, "pidfd_open", opener)
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        runner.run(_lifecycle())
