"""``sluice serve``: build everything from the settings, serve, drain on SIGTERM / SIGINT.

After the start-up load one line says what serves (``ready: serving ...``) and another what
failed to load and why; when nothing loaded, the server says so, stops, and exits 1.

The drain's order: health NOT_SERVING, new calls refused (UNAVAILABLE), in-flight calls and
streams finish within ``drain_grace_s`` (those still running then get UNAVAILABLE), models
unload within ``drain_unload_s``, then queued spans are flushed and the metrics endpoint
stops; the exit status is 0. A backend thread still busy at the end (hung) never keeps the
process alive (``run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.errors import ConfigError
from sluice.eventloop import loop_factory, loop_name
from sluice.loader import freeze_heap
from sluice.machine import default_workers, usable_cores
from sluice.metrics import Metrics
from sluice.registry import IndexEntry, ModelRegistry
from sluice.repository import EXAMPLE_REPOSITORY
from sluice.settings import Settings
from sluice.tracing import Tracing
from sluice.transport.server import SluiceServer, create_server

if TYPE_CHECKING:
    from sluice.workers.lane import LaneServer
    from sluice.workers.topology import EngineSocket, Transports

log = logging.getLogger(__name__)


def set_torch_threads(settings: Settings) -> None:
    """Leave the event loop a core: torch's default (every core) starves it under load."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch

    threads = settings.executor.torch_threads or max(1, usable_cores() - 1)
    torch.set_num_threads(threads)
    log.info("torch uses %d intra-op thread(s)", threads)


def summarize(rows: Iterable[IndexEntry]) -> tuple[list[str], list[str]]:
    """The repository index as (``"model (versions 1, 2)"`` per model with a loaded version,
    ``"model version 3: reason"`` per version or model that failed to load)."""
    loaded: dict[str, list[str]] = {}
    failed: list[str] = []
    for row in rows:
        if row.spec is not None:
            loaded.setdefault(row.name, []).append(row.version)
        else:
            failed.append(
                f"{row.name}{f' version {row.version}' if row.version else ''}: {row.reason}"
            )
    return [
        f"{name} (version{'s' if len(versions) > 1 else ''} {', '.join(versions)})"
        for name, versions in loaded.items()
    ], failed


def report_start(registry: ModelRegistry, repository: Path) -> bool:
    """Log what loaded and what failed (with the reason); False when nothing loaded."""
    rows = registry.index()
    loaded, failed = summarize(rows)
    if failed:
        log.error("not loaded: %s", "; ".join(failed))
    if not loaded:
        models = len({row.name for row in rows})
        what = f"none of the {models} model(s) in" if models else "no model in"
        log.error("nothing to serve: %s %s loaded; exiting with status 1", what, repository)
        return False
    log.info("ready: serving %s", ", ".join(loaded))
    return True


async def serve(settings: Settings) -> int:
    if settings.workers is None:
        cores = usable_cores()
        settings = settings.model_copy(update={"workers": default_workers(cores)})
        log.info("workers %d, chosen from the machine (%d usable cores)", settings.workers, cores)
    if settings.workers == 1:
        return await _serve(settings, None)
    from sluice.workers.topology import EngineSocket

    engine = EngineSocket.create()
    try:
        return await _serve(settings, engine)
    finally:
        engine.remove()


async def _serve(settings: Settings, engine: EngineSocket | None) -> int:
    """Serve; with ``engine``, on that private socket behind ``settings.workers``
    transport processes (``sluice.workers``)."""
    clock = time.monotonic
    set_torch_threads(settings)
    metrics = Metrics()
    tracing = Tracing.from_environment(settings.tracing)
    repository = settings.model_repository or EXAMPLE_REPOSITORY
    try:
        registry = ModelRegistry(
            settings, repository=repository, metrics=metrics, clock=clock, tracing=tracing
        )
    except ConfigError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
    http = None
    try:
        if settings.metrics_port is not None:
            http = metrics.serve_http(settings.host, settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", settings.host, http.port)
        server = await create_server(
            settings,
            registry,
            metrics=metrics,
            clock=clock,
            tracing=tracing,
            listen=engine.address if engine is not None else None,
        )
        if engine is not None:
            server.front = await _start_transports(settings, engine, metrics, server)
    except ConfigError as exc:
        log.error("cannot start: %s", exc.message)
        if http is not None:
            http.close()
        return 1
    except (OSError, RuntimeError) as exc:
        log.error(
            "cannot listen on %s (grpc_port %s, metrics_port %s): %s",
            settings.host,
            settings.grpc_port,
            settings.metrics_port,
            exc,
        )
        if http is not None:
            http.close()
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    log.info("loading models from %s", repository)
    status = await _load_and_serve(registry, server, repository, stop)
    await server.drain(
        settings.drain_grace_s,
        settings.drain_quiet_s,
        settings.drain_unload_s,
        notice_s=settings.drain_notice_s,
    )
    await tracing.shutdown()
    if http is not None:
        http.close()
    log.info("stopped")
    return status


async def _start_lane(
    settings: Settings, engine: EngineSocket, metrics: Metrics, server: SluiceServer
) -> LaneServer:
    """The engine lane the transports send their unary calls through (``workers.lane``)."""
    from sluice.workers.lane import LaneServer

    assert server.methods is not None  # create_server always makes the table
    lane = LaneServer(
        server.methods,
        max_message_bytes=settings.max_message_bytes,
        settings=settings.lane,
        metrics=metrics.lane,
    )
    try:
        await lane.start(engine.lane)
    except BaseException:
        await server.grpc_server.stop(0)
        raise
    return lane


async def _start_transports(
    settings: Settings, engine: EngineSocket, metrics: Metrics, server: SluiceServer
) -> Transports:
    """The transport processes in front of ``server``; stops ``server`` when they fail."""
    from sluice.workers.topology import Transports

    lane = await _start_lane(settings, engine, metrics, server)
    transports = Transports(settings, engine, metrics, lane=lane)
    try:
        port = await transports.start()
    except BaseException:
        await lane.close(0)
        await server.grpc_server.stop(0)
        raise
    transport = "plaintext" if not settings.tls.enabled else "TLS"
    log.info(
        "gRPC listening on %s:%d (%s; workers %d: %s)",
        settings.host,
        port,
        transport,
        settings.workers,
        transports.describe(),
    )
    return transports


async def _load_and_serve(
    registry: ModelRegistry, server: SluiceServer, repository: Path, stop: asyncio.Event
) -> int:
    """Load the models, say what serves, serve until ``stop``: the exit status (1 when
    nothing loaded)."""
    if not await _until_stopped(registry.load_all(), stop):
        log.info("stopping before the start-up load finished")
        return 0
    if not report_start(registry, repository):
        return 1
    freeze_heap()
    await server.mark_started()
    await stop.wait()
    return 0


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it): whether it finished."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


_IDLE_THREADS_EXIT_S = 1.0
"""At exit, how long idle worker threads get to notice they are done."""


def run(settings: Settings) -> int:
    """Serve until SIGTERM / SIGINT and return the exit status.

    Like ``asyncio.run``, but the end is bounded: ``asyncio.run`` waits without limit for
    its worker threads, and the interpreter waits for them again at exit, so one call stuck
    in a backend would keep the process alive after the drain. Here the workers are not
    waited for; if any thread is still busy at the end, the process exits at once.
    """
    try:
        factory = loop_factory(settings.event_loop)
    except ConfigError as exc:  # uvloop asked for and missing: a log line, not a traceback
        log.error("cannot start: %s", exc.message)
        return 1
    loop = factory()
    asyncio.set_event_loop(loop)
    log.info("event loop: %s", loop_name(loop))
    workers = ThreadPoolExecutor(thread_name_prefix="sluice-worker")
    loop.set_default_executor(workers)
    try:
        code = loop.run_until_complete(serve(settings))
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
        workers.shutdown(wait=False, cancel_futures=True)
        asyncio.set_event_loop(None)
        loop.close()
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    give_up_at = time.monotonic() + _IDLE_THREADS_EXIT_S
    for thread in others:  # idle workers end at once; a busy one is not waited for
        if not thread.daemon:
            thread.join(max(0.0, give_up_at - time.monotonic()))
    busy = [t.name for t in others if t.is_alive() and not t.daemon]
    if busy:
        log.warning("exiting with %d thread(s) still busy: %s", len(busy), ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code
