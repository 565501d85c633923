"""A transport process as the engine starts and watches it, on any event loop.

It is started by ``subprocess.Popen`` (which uses vfork or posix_spawn: no fork handlers
run in the engine, whose grpc threads are busy) rather than the loop's own subprocess
support: uvloop's forks, and grpc's fork handlers then print a line of their own ("Other
threads are currently calling into gRPC, skipping fork() handlers") into the engine's
JSON log. Its stdout is read through the loop; its exit is seen through a pidfd, so it is
reaped as soon as it ends, whether or not anyone waits for it. Where there is no pidfd
(kernels before 5.3, sandboxes that refuse ``pidfd_open``), a thread of its own waits for
it: never one of the loop's default executor, whose threads the server needs for its calls
(a long-lived child would hold one for its whole life).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence


class Child:
    """One started process: its pid, exit status once ended, stdout lines, stdin lines."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader,
        pipe: asyncio.BaseTransport,
    ) -> None:
        self._popen = popen
        self.stdout = stdout
        self._pipe = pipe
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        # On the loop, as asyncio's own subprocess support does: vfork and exec take about
        # a millisecond, and the loop must know the process before anything else runs.
        popen = subprocess.Popen(  # noqa: ASYNC220
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env), bufsize=0
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        assert popen.stdout is not None
        try:
            pipe, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), popen.stdout
            )
        except BaseException:  # cancelled (the server is stopping) or no pipe: nobody
            popen.kill()  # would ever watch it, so it must not live on
            for pipe_end in (popen.stdin, popen.stdout):
                if pipe_end is not None:
                    pipe_end.close()
            _wait_in_thread(popen, lambda status: None)
            raise
        child = cls(popen, reader, pipe)
        child._watch(loop)
        return child

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def write(self, line: str) -> None:
        """One line to its stdin (ignored once it has gone)."""
        if self._popen.stdin is not None and self.returncode is None:
            with contextlib.suppress(OSError):
                self._popen.stdin.write(line.encode())

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd here: a thread of its own waits instead

            def ended(status: int) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(self._ended, status)

            _wait_in_thread(self._popen, ended)
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._ended(self._popen.wait())  # it has exited: this reaps it at once

        loop.add_reader(pidfd, readable)

    def _ended(self, status: int) -> None:
        """It exited: its pipes are closed (a loop cannot close with them open)."""
        self._pipe.close()
        if self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()
        if not self._exited.done():
            self._exited.set_result(status)


def _wait_in_thread(popen: subprocess.Popen[bytes], then: Callable[[int], None]) -> None:
    """Reap ``popen`` on a daemon thread of its own and hand ``then`` its exit status."""
    threading.Thread(
        target=lambda: then(popen.wait()), name=f"sluice-reap-{popen.pid}", daemon=True
    ).start()
