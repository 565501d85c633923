"""One worker thread per executor instance, fed from a shared queue.

The event loop hands a batch over with one queue put and gets the result back with one
``call_soon_threadsafe``; this costs the loop about a third less CPU per run than
``run_in_executor`` (no concurrent.futures future to chain), and each thread owns its
instance (session, module), so no instance is ever shared between threads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sluice.errors import ModelNotReadyError

Instance = TypeVar("Instance")
Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class _Item(Generic[Job, Result]):
    job: Job
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop


def _deliver(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():  # the caller may have gone
        future.set_result(result)


def _fail(future: asyncio.Future[Result], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class InstanceThreads(Generic[Instance, Job, Result]):
    def __init__(
        self,
        instances: list[Instance],
        work: Callable[[Instance, Job], Result],
        *,
        name: str,
    ) -> None:
        self._work = work
        self._closed = False
        self._jobs: queue.SimpleQueue[_Item[Job, Result] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, args=(instance,), name=f"{name}-{i}", daemon=True)
            for i, instance in enumerate(instances)
        ]
        for thread in self._threads:
            thread.start()

    async def submit(self, job: Job) -> Result:
        if self._closed:
            raise ModelNotReadyError("this model version is unloaded; its executor is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._jobs.put(_Item(job, future, loop))
        return await future

    def _serve(self, instance: Instance) -> None:
        while (item := self._jobs.get()) is not None:
            try:
                result = self._work(instance, item.job)
            except BaseException as exc:  # handed to the awaiting caller, never lost
                item.loop.call_soon_threadsafe(_fail, item.future, exc)
            else:
                item.loop.call_soon_threadsafe(_deliver, item.future, result)

    async def close(self) -> None:
        """Let queued jobs finish, then stop every thread."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
