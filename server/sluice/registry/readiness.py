"""Who hears that a model's readiness may have changed (per-model health), and the
registry's background work (telling them after a breaker changed state inside a call,
following shared serving pointers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

#: Called with (model name, serving) whenever a model's readiness may have changed.
ReadinessListener = Callable[[str, bool], Awaitable[None]]


class Readiness:
    def __init__(self) -> None:
        self._listeners: list[ReadinessListener] = []
        self._background: set[asyncio.Task[None]] = set()

    def add(self, listener: ReadinessListener) -> None:
        self._listeners.append(listener)

    async def notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            await listener(name, serving)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the registry keeps until it ends (or ``stop``)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
