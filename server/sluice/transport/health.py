"""grpc.health.v1.Health: grpc's own servicer, with Watch calls that end at shutdown, and a
liveness service name.

A Watch call never ends by itself, so the stock servicer's watchers would hold the server's
``stop(grace)`` until the grace runs out. Here ``end_watches`` (a drain step, after health
went NOT_SERVING and the in-flight work finished) closes every Watch with UNAVAILABLE, which
tells the watcher to look for another replica.

``sluice.liveness`` (``LIVENESS_SERVICE``) answers SERVING for as long as the process
answers at all: before the models load, while they fail and while draining. It is what a
liveness probe asks (restart only a process that is stuck), where readiness asks ``""``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from sluice_client.names import LIVENESS_SERVICE

_ALIVE = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service == LIVENESS_SERVICE:
            return _ALIVE
        return await super().Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if request.service == LIVENESS_SERVICE:
            watching = asyncio.ensure_future(self._alive(context))
        else:
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

    async def _alive(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.write(_ALIVE)
        await asyncio.Event().wait()  # until the watch ends

    def end_watches(self) -> None:
        """End every Watch call, now and from now on."""
        self._ending.set()
