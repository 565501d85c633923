"""``sluice serve``: build everything from the settings, serve, drain on SIGTERM / SIGINT.

After the start-up load one line says what serves (``ready: serving ...``) and another what
failed to load and why; when nothing loaded, the server says so, stops, and exits 1.

The drain's order: health NOT_SERVING, new calls refused (UNAVAILABLE), in-flight calls and
streams finish within ``drain_grace_s``, models unload, then queued spans are flushed and
the metrics endpoint stops; the exit status is 0.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from sluice.errors import ConfigError
from sluice.metrics import Metrics
from sluice.repository import EXAMPLE_REPOSITORY
from sluice.service import IndexEntry, InferenceService
from sluice.settings import Settings
from sluice.tracing import Tracing
from sluice.transport.server import create_server

log = logging.getLogger(__name__)


def set_torch_threads(settings: Settings) -> None:
    """Leave the event loop a core: torch's default (every core) starves it under load."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch

    threads = settings.executor.torch_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    log.info("torch uses %d intra-op thread(s)", threads)


def summarize(rows: Iterable[IndexEntry]) -> tuple[list[str], list[str]]:
    """The repository index as (``"model (versions 1, 2)"`` per model with a loaded version,
    ``"model version 3: reason"`` per version or model that failed to load)."""
    loaded: dict[str, list[str]] = {}
    failed: list[str] = []
    for row in rows:
        if row.loaded is not None:
            loaded.setdefault(row.name, []).append(row.version)
        else:
            failed.append(
                f"{row.name}{f' version {row.version}' if row.version else ''}: {row.reason}"
            )
    return [
        f"{name} (version{'s' if len(versions) > 1 else ''} {', '.join(versions)})"
        for name, versions in loaded.items()
    ], failed


def report_start(service: InferenceService, repository: Path) -> bool:
    """Log what loaded and what failed (with the reason); False when nothing loaded."""
    rows = service.index()
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
    clock = time.monotonic
    set_torch_threads(settings)
    metrics = Metrics()
    tracing = Tracing.from_environment(settings.tracing)
    repository = settings.model_repository or EXAMPLE_REPOSITORY
    try:
        service = InferenceService(
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
            settings, service, metrics=metrics, clock=clock, tracing=tracing
        )
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
    await service.load_all()
    serving = report_start(service, repository)
    if serving:
        await server.mark_started()
        await stop.wait()
    await server.drain(settings.drain_grace_s if serving else 0, settings.drain_quiet_s)
    await tracing.shutdown()
    if http is not None:
        http.close()
    log.info("stopped")
    return 0 if serving else 1
