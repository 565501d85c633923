"""The engine's side of ``--workers N``: its private socket and the transport processes.

The engine (the process ``sluice serve`` runs in) listens on a Unix socket in a fresh 0700
temporary directory (``EngineSocket``), removed at exit. ``Transports`` starts the N
transport processes as fresh interpreters (never forked from this process with grpc
running in it): the first binds the configured port (0: any), the others the port it got,
all with ``SO_REUSEPORT``; only then is ``gRPC listening on host:port`` logged. A transport
that exits while the server runs is started again (logged, counted in
``sluice_transport_restarts_total``). The drain stops them after the engine has refused new
calls and seen its in-flight ones finish (``SluiceServer.drain``); they die with the engine
if it is killed (``PR_SET_PDEATHSIG``, and their stdin closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sluice.metrics import Metrics
from sluice.settings import Settings
from sluice.workers import shm
from sluice.workers.child import Child
from sluice.workers.lane import LaneServer
from sluice.workers.port_lock import PortLock
from sluice.workers.transport import TransportConfig

log = logging.getLogger(__name__)

START_LIMIT_S = 60.0
"""How long a transport process may take to start listening (a fresh interpreter)."""
RESTART_DELAYS_S = (0.1, 0.5, 2.0, 5.0)
"""Waits before starting a transport that exited again, one more each time it exits
within ``STEADY_S`` of its start (then the last, until it stays up)."""
STEADY_S = 30.0
"""A transport up this long counts as healthy: its next restart waits the first delay."""


MALLOC_DEFAULTS = {"MALLOC_ARENA_MAX": "2"}
MMAP_THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold"
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def transport_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a transport process starts with: the engine's, with glibc's malloc
    told to hand large buffers back (where the operator has not set these already).

    A transport holds several copies of a request on its way (grpc's receive buffer, the
    Python bytes, grpc's send buffer). With glibc's defaults a freed large block raises the
    size below which blocks come from a heap, and each of grpc's threads may get a heap of
    its own: freed copies stay as holes in several heaps, and twelve refused 20 MB requests
    in a row raised a transport's peak memory by 33 to 151 MB (four runs of the
    hostile-input suite's case). Blocks of 4 MiB or more mapped and unmapped on their own,
    and two heaps: 63 to 86 MB (seven runs). The price: a large message's pages are
    faulted in afresh."""
    env = dict(environ)
    for key, value in MALLOC_DEFAULTS.items():
        env.setdefault(key, value)
    tunables = env.get("GLIBC_TUNABLES", "")
    if MMAP_THRESHOLD_TUNABLE not in tunables:
        ours = f"{MMAP_THRESHOLD_TUNABLE}={MMAP_THRESHOLD_BYTES}"
        env["GLIBC_TUNABLES"] = f"{tunables}:{ours}" if tunables else ours
    return env


class TransportStartError(RuntimeError):
    """A transport process did not start listening."""


@dataclass(frozen=True, slots=True)
class EngineSocket:
    """The engine's private Unix socket, in a directory only this user can enter."""

    directory: Path

    @classmethod
    def create(cls) -> EngineSocket:
        directory = Path(tempfile.mkdtemp(prefix="sluice-engine-"))  # mode 0700
        return cls(directory)

    @property
    def address(self) -> str:
        return f"unix:{self.directory / 'engine.sock'}"

    @property
    def lane(self) -> Path:
        """The engine lane's socket (``workers.lane``): the transports' unary calls."""
        return self.directory / "lane.sock"

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class Transports:
    """The N transport processes in front of the engine."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineSocket,
        metrics: Metrics,
        *,
        lane: LaneServer | None = None,
        python: str = sys.executable,
    ) -> None:
        self._settings = settings
        #: ``workers`` as the engine resolved it (``app.serve``: chosen from the machine).
        self.count = settings.workers or 1
        self._lane = lane
        self._port_lock: PortLock | None = None
        self._engine = engine
        self._python = python
        self._metrics = metrics
        self._procs: dict[int, Child] = {}
        metrics.lane.transports.watch(self._running)
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        self.port = settings.grpc_port

    def _running(self) -> dict[int, int]:
        return {i: p.pid for i, p in self._procs.items() if p.returncode is None}

    async def start(self) -> int:
        """Start every transport; the public port. ``TransportStartError`` when one cannot
        listen (the others are stopped)."""
        self._sweep(None)  # what transports of a killed server left
        if self._settings.grpc_port:  # (port 0: the kernel picks a port no one holds)
            self._port_lock = PortLock.take(self._settings.grpc_port)
        try:
            self.port = await self._spawn(0, self._settings.grpc_port)
            await asyncio.gather(*(self._spawn(i, self.port) for i in range(1, self.count)))
        except BaseException:
            self.begin_stop(0.0)
            await self.wait_stopped(1.0)
            self._release_port()
            raise
        self._supervisors = [
            asyncio.create_task(self._supervise(i), name=f"sluice-transport-{i}")
            for i in range(self.count)
        ]
        return self.port

    def _config(self, index: int, port: int) -> TransportConfig:
        s = self._settings
        return TransportConfig(
            index=index,
            engine=self._engine.address,
            lane=str(self._engine.lane),
            lane_shared_min_bytes=s.lane.shared_min_bytes,
            lane_max_backlog_bytes=s.lane.max_backlog_bytes,
            lane_max_metadata_bytes=s.lane.max_metadata_bytes,
            lane_stream_window_bytes=s.lane.stream_window_bytes,
            host=s.host,
            port=port,
            parent_pid=os.getpid(),
            max_message_bytes=s.max_message_bytes,
            max_connection_age_s=s.max_connection_age_s,
            max_connection_age_grace_s=s.max_connection_age_grace_s,
            tls=s.tls.model_dump(mode="json"),
            tracing=s.tracing.model_dump(mode="json"),
            log_level=s.log_level,
            log_format=s.log_format,
            event_loop=s.event_loop,
        )

    async def _spawn(self, index: int, port: int) -> int:
        """Start transport ``index`` on ``port``; the port it listens on."""
        argv = (self._python, "-m", "sluice.workers.transport", self._config(index, port).to_json())
        proc = await Child.start(argv, transport_environment(os.environ))
        self._procs[index] = proc
        try:
            async with asyncio.timeout(START_LIMIT_S):
                line = await proc.stdout.readline()
        except TimeoutError:
            proc.kill()
            line = b""
        except BaseException:  # cancelled, or a line too long to read: a process whose port
            proc.kill()  # is unknown must not live on untracked (a retry replaces it here)
            raise
        command, _, value = line.decode(errors="replace").strip().partition(" ")
        if command != "port" or not value.isdigit():
            status = await proc.wait()
            raise TransportStartError(
                f"transport process {index} did not start listening on "
                f"{self._settings.host}:{port} (exit status {status}; its log says why)"
            )
        self._metrics.transport_processes.inc()
        return int(value)

    async def _supervise(self, index: int) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            status = await self._procs[index].wait()
            self._metrics.transport_processes.dec()
            self._sweep(self._procs[index].pid)
            if self._stopping:
                return
            failures = 0 if loop.time() - started >= STEADY_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            log.error(
                "transport process %d exited with status %s; starting it again in %.1fs",
                index,
                status,
                delay,
            )
            self._metrics.transport_restarts.inc()
            await asyncio.sleep(delay)
            while not self._stopping:
                try:
                    await self._spawn(index, self.port)
                    log.info("transport process %d serves again", index)
                    break
                except Exception as exc:  # whatever it was, the transport must not stay down
                    if isinstance(exc, (TransportStartError, OSError)):  # OSError: no exec
                        log.error("%s; trying again in %.1fs", exc, RESTART_DELAYS_S[-1])
                    else:
                        log.exception(
                            "transport process %d could not be started again; trying again "
                            "in %.1fs",
                            index,
                            RESTART_DELAYS_S[-1],
                        )
                    await asyncio.sleep(RESTART_DELAYS_S[-1])
            if self._stopping:
                return

    def begin_stop(self, grace_s: float) -> None:
        """Tell every transport to stop: no new calls, those in flight get ``grace_s``."""
        self._stopping = True
        for proc in self._procs.values():
            proc.write(f"stop {grace_s:.3f}\n")

    async def wait_stopped(self, limit_s: float) -> None:
        """Wait for the transports to exit; kill any still running after ``limit_s``."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        procs = [p for p in self._procs.values() if p.returncode is None]
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=limit_s)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("transport process %d did not stop in time; killing it", proc.pid)
                    proc.kill()
                    await proc.wait()
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for proc in self._procs.values():
            self._sweep(proc.pid)
        log.info("transport processes exited")
        self._release_port()
        if self._lane is not None:  # nothing more can come through it
            await self._lane.close()

    def _release_port(self) -> None:
        if self._port_lock is not None:
            self._port_lock.release()
            self._port_lock = None

    def describe(self) -> str:
        return "transport processes in front of one engine process"

    @staticmethod
    def _sweep(pid: int | None) -> None:
        """Remove the shared-memory requests a transport (None: any dead one) left."""
        removed = shm.sweep(pid)
        if removed:
            log.warning("removed %d shared-memory request(s) left by a transport", removed)
