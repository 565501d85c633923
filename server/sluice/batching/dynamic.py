"""The dynamic batcher: one per model version.

Requests wait in a bounded queue (``batching.queue``). Whenever an executor instance is
free, the batcher takes the next batch from it: the most urgent request (by priority level,
then age; an aged one counts as the most urgent) and every queued request of the same
shape, up to ``max_batch_size`` rows, after waiting up to ``max_queue_delay_us`` for more.
Requests whose caller has gone or whose deadline has passed are dropped before they reach
the executor. A batch the backend rejects as bad input is
re-run one request at a time, so one bad request never fails its neighbours.

How inputs become a batch and outputs become answers is ``batching.arithmetic``; what the
batcher measures (queue depth, drops, each run's timings) goes to its ``BatchObserver``
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Protocol

from sluice.batching import arithmetic
from sluice.batching.queue import BatchQueue, Pending
from sluice.breaker import BackendBreaker
from sluice.clock import Clock
from sluice.errors import (
    ExecutorError,
    InvalidInputError,
    OverloadedError,
    SluiceError,
)
from sluice.executors.base import Executor
from sluice.priority import Priorities
from sluice.repository import BatchingPolicy
from sluice.stats import BatchRun
from sluice.tensors import Array
from sluice.tracing import Tracing, now_ns

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives everything the batcher measures (metrics and the version's statistics)."""

    def queue_depth(self, depth: int) -> None: ...
    def inflight(self, delta: int) -> None: ...
    def batch_done(self, run: BatchRun) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def level_depth(self, level: int, depth: int) -> None: ...
    def shed(self, level: int) -> None: ...


class DynamicBatcher:
    def __init__(
        self,
        *,
        name: str,
        executor: Executor,
        policy: BatchingPolicy,
        batched: bool,
        breaker: BackendBreaker,
        observer: BatchObserver,
        instance_count: int = 1,
        pushback_ms: int = 50,
        max_execution_s: float = 60.0,
        clock: Clock,
        tracing: Tracing | None = None,
        span_attributes: Mapping[str, str] | None = None,
        priorities: Priorities | None = None,
    ) -> None:
        self.name = name
        self._executor = executor
        self._batched = batched
        self._breaker = breaker
        self._observer = observer
        self._pushback_ms = pushback_ms
        self._max_execution_s = max_execution_s
        self._clock = clock
        self._tracing = tracing or Tracing.off()
        self._span_attributes = dict(span_attributes or {"sluice.batcher": name})
        self._queue = BatchQueue(
            name=name,
            policy=policy,
            batched=batched,
            observer=observer,
            clock=clock,
            pushback_ms=pushback_ms,
            priorities=priorities,
        )
        self._slots = asyncio.Semaphore(instance_count)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    # -- public surface -------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(
        self, inputs: Mapping[str, Array], *, deadline: float | None, priority: int = 0
    ) -> dict[str, Array]:
        """Queue one request at ``priority`` (0: the default level) and wait for its outputs
        (all of them, batch rows sliced)."""
        trace = self._tracing.capture()
        pending = Pending(
            inputs=inputs,
            rows=arithmetic.rows(inputs, batched=self._batched),
            signature=arithmetic.signature(inputs, batched=self._batched),
            deadline=deadline,
            enqueued_at=self._clock(),
            future=asyncio.get_running_loop().create_future(),
            trace=trace,
            enqueued_ns=0 if trace is None else now_ns(),
            level=priority,
        )
        self._queue.put(pending)
        self._observer.inflight(1)
        try:
            return await pending.future
        finally:
            self._observer.inflight(-1)

    async def close(self) -> None:
        """Stop taking batches, wait for running ones, fail whatever is still queued."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._queue.fail_all(
            OverloadedError(
                f"model {self.name} was unloaded before this request ran",
                retry_after_ms=self._pushback_ms,
            )
        )

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._queue.next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("batch task failed", exc_info=task.exception())

    # -- execution ------------------------------------------------------------------------

    async def _execute(self, batch: list[Pending]) -> None:
        started = self._clock()
        rows = sum(p.rows for p in batch)
        try:
            outputs, input_s, infer_s = await self._run_batch(batch, rows)
        except InvalidInputError as exc:
            if len(batch) == 1:
                _resolve_error(batch[0].future, exc)
                return
            # Someone in this batch is bad input the validation could not see: find them.
            await asyncio.gather(*(self._execute([pending]) for pending in batch))
            return
        except SluiceError as exc:
            for pending in batch:
                _resolve_error(pending.future, exc)
            return
        split_started = self._clock()
        request_rows = [p.rows for p in batch]
        for pending, part in zip(batch, arithmetic.split(outputs, request_rows), strict=True):
            _resolve_result(pending.future, part)
        output_s = self._clock() - split_started
        self._observer.batch_done(
            BatchRun(
                rows=request_rows,
                queue_s=[started - p.enqueued_at for p in batch],
                input_s=input_s,
                infer_s=infer_s,
                output_s=output_s,
                size=rows,
            )
        )

    async def _run_batch(
        self, batch: list[Pending], rows: int
    ) -> tuple[dict[str, Array], float, float]:
        """Run one batch in its ``sluice.batch`` span (linked to its requests' spans, after a
        ``sluice.queue_wait`` span for each): its outputs, and the seconds spent building
        its inputs and running it. Anything the backend does wrong (a hang past the batch's
        time limit, an exception of its own) is a backend fault, counted by its breaker."""
        waits = ((p.trace, p.enqueued_ns) for p in batch)
        with self._tracing.batch_span(waits, self._span_attributes, rows=rows):
            t0 = self._clock()
            inputs = arithmetic.merge([p.inputs for p in batch])
            t1 = self._clock()
            limit_s = self._execution_limit_s(batch)
            with self._breaker.calling():
                try:
                    async with asyncio.timeout(limit_s):
                        outputs = await self._executor.run(inputs)
                except TimeoutError as exc:  # a hung backend is a backend fault
                    raise ExecutorError(
                        f"model {self.name}: the backend did not finish a batch in {limit_s:.3f}s"
                    ) from exc
                except SluiceError:
                    raise
                except Exception as exc:  # a backend bug must still count against its breaker
                    raise ExecutorError(
                        f"model {self.name}: the backend raised {type(exc).__name__}"
                    ) from exc
            t2 = self._clock()
            if self._batched:
                arithmetic.check_rows(outputs, rows, model=self.name)
        return outputs, t1 - t0, t2 - t1

    def _execution_limit_s(self, batch: list[Pending]) -> float:
        """How long a batch may run: until its last caller's deadline, at most the cap."""
        deadlines = [p.deadline for p in batch if p.deadline is not None]
        if len(deadlines) < len(batch):
            return self._max_execution_s
        return max(0.0, min(self._max_execution_s, max(deadlines) - self._clock()))


def _resolve_result(future: asyncio.Future[dict[str, Array]], value: dict[str, Array]) -> None:
    if not future.done():
        future.set_result(value)


def _resolve_error(future: asyncio.Future[dict[str, Array]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
