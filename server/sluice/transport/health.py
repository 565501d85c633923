"""grpc.health.v1.Health: grpc's own servicer, with Watch calls that end at shutdown.

A Watch call never ends by itself, so the stock servicer's watchers would hold the server's
``stop(grace)`` until the grace runs out. Here ``end_watches`` (a drain step, after health
went NOT_SERVING and the in-flight work finished) closes every Watch with UNAVAILABLE, which
tells the watcher to look for another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait((watching, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; watch another replica"
        )

    def end_watches(self) -> None:
        """End every Watch call, now and from now on."""
        self._ending.set()
