"""The dynamic batcher: one per model version.

Requests wait in a bounded queue. Whenever an executor instance is free, the batcher takes
the oldest request and every queued request of the same shape, up to ``max_batch_size``
rows; with ``max_queue_delay_us`` it may first wait a little for more (a preferred size ends
the wait). Requests whose caller has gone or whose deadline has passed are dropped before
they reach the executor. A batch the backend rejects as bad input is re-run one request at a
time, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sluice.breaker import BackendBreaker
from sluice.clock import Clock
from sluice.errors import (
    DeadlineExceededError,
    ExecutorError,
    InvalidInputError,
    OverloadedError,
    SluiceError,
)
from sluice.executors.base import Executor
from sluice.repository import BatchingPolicy
from sluice.stats import ModelStats
from sluice.tensors import Array
from sluice.tracing import Context, Tracing, now_ns

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives what the batcher measures (metrics live in the transport's registry)."""

    def queue_depth(self, depth: int) -> None: ...
    def inflight(self, delta: int) -> None: ...
    def batch_done(self, *, size: int, queue_s: list[float], compute_s: float) -> None: ...
    def dropped(self, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class _Pending:
    inputs: Mapping[str, Array]
    rows: int
    signature: tuple[object, ...]
    deadline: float | None
    enqueued_at: float
    future: asyncio.Future[dict[str, Array]] = field(repr=False)
    #: The caller's trace context and enqueue time (wall clock, ns) while tracing is on.
    trace: Context | None = field(default=None, repr=False)
    enqueued_ns: int = 0


def _signature(inputs: Mapping[str, Array], batched: bool) -> tuple[object, ...]:
    return tuple(
        (name, array.dtype.str, array.shape[1:] if batched else array.shape)
        for name, array in sorted(inputs.items())
    )


class DynamicBatcher:
    def __init__(
        self,
        *,
        name: str,
        executor: Executor,
        policy: BatchingPolicy,
        batched: bool,
        breaker: BackendBreaker,
        stats: ModelStats,
        observer: BatchObserver,
        instance_count: int = 1,
        pushback_ms: int = 50,
        max_execution_s: float = 60.0,
        clock: Clock,
        tracing: Tracing | None = None,
        span_attributes: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._executor = executor
        self._policy = policy
        self._batched = batched
        self._breaker = breaker
        self._stats = stats
        self._observer = observer
        self._pushback_ms = pushback_ms
        self._max_execution_s = max_execution_s
        self._clock = clock
        self._tracing = tracing or Tracing.off()
        self._span_attributes = dict(span_attributes or {"sluice.batcher": name})
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
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
        self, inputs: Mapping[str, Array], *, deadline: float | None
    ) -> dict[str, Array]:
        """Queue one request and wait for its outputs (all of them, batch rows sliced)."""
        if len(self._queue) >= self._policy.max_queue_size:
            self._observer.dropped("queue_full")
            raise OverloadedError(
                f"model {self.name} has {len(self._queue)} requests queued (the limit); "
                "retry after the suggested back-off",
                retry_after_ms=self._pushback_ms,
            )
        rows = next(iter(inputs.values())).shape[0] if self._batched and inputs else 1
        pending = _Pending(
            inputs=inputs,
            rows=rows,
            signature=_signature(inputs, self._batched),
            deadline=deadline,
            enqueued_at=self._clock(),
            future=asyncio.get_running_loop().create_future(),
        )
        if self._tracing.enabled:
            pending.trace, pending.enqueued_ns = self._tracing.capture(), now_ns()
        self._queue.append(pending)
        self._observer.queue_depth(len(self._queue))
        self._observer.inflight(1)
        self._arrived.set()
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
        while self._queue:
            _resolve_error(
                self._queue.popleft().future,
                OverloadedError(
                    f"model {self.name} was unloaded before this request ran",
                    retry_after_ms=self._pushback_ms,
                ),
            )
        self._observer.queue_depth(0)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
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

    async def _next_batch(self) -> list[_Pending]:
        while True:
            self._drop_gone()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._maybe_wait_for_more()
            batch = self._take()
            if batch:
                return batch

    async def _maybe_wait_for_more(self) -> None:
        delay_s = self._policy.max_queue_delay_us / 1e6
        if delay_s <= 0:
            return
        head = self._queue[0]
        while not self._ready_to_go(head):
            remaining = head.enqueued_at + delay_s - self._clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _ready_to_go(self, head: _Pending) -> bool:
        rows = sum(p.rows for p in self._queue if p.signature == head.signature)
        return rows >= self._policy.max_batch_size or rows in self._policy.preferred_batch_sizes

    def _take(self) -> list[_Pending]:
        """Pop the head and the queued requests that fit its batch, in arrival order."""
        self._drop_gone()
        if not self._queue:
            return []
        head = self._queue[0]
        batch: list[_Pending] = []
        rest: deque[_Pending] = deque()
        rows = 0
        for pending in self._queue:
            fits = rows + pending.rows <= self._policy.max_batch_size
            if pending.signature == head.signature and fits and (self._batched or not batch):
                batch.append(pending)
                rows += pending.rows
            else:
                rest.append(pending)
        self._queue = rest
        self._observer.queue_depth(len(self._queue))
        return batch

    def _drop_gone(self) -> None:
        """Drop requests whose caller left or whose deadline passed while they queued."""
        if not self._queue:
            return
        now = self._clock()
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.future.done():
                self._count_drop("cancelled")
            elif pending.deadline is not None and now >= pending.deadline:
                self._count_drop("deadline")
                pending.future.set_exception(
                    DeadlineExceededError(
                        f"the deadline passed after {now - pending.enqueued_at:.3f}s in "
                        f"model {self.name}'s queue, before the request could run"
                    )
                )
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._observer.queue_depth(len(kept))

    def _count_drop(self, reason: str) -> None:
        self._stats.dropped += 1
        self._observer.dropped(reason)

    # -- execution ------------------------------------------------------------------------

    async def _execute(self, batch: list[_Pending]) -> None:
        started = self._clock()
        try:
            if self._tracing.enabled:
                outputs, input_s, infer_s = await self._run_traced(batch)
            else:
                outputs, input_s, infer_s = await self._run_batch(batch)
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
        self._deliver(batch, outputs)
        output_s = self._clock() - split_started
        queue_s = [started - p.enqueued_at for p in batch]
        size = sum(p.rows for p in batch)
        self._stats.record_batch(size=size, input_s=input_s, infer_s=infer_s, output_s=output_s)
        for pending, waited in zip(batch, queue_s, strict=True):
            self._stats.record_request(
                rows=pending.rows,
                queue_s=waited,
                input_s=input_s,
                infer_s=infer_s,
                output_s=output_s,
            )
        self._observer.batch_done(size=size, queue_s=queue_s, compute_s=infer_s)

    async def _run_traced(self, batch: list[_Pending]) -> tuple[dict[str, Array], float, float]:
        """``_run_batch`` in a ``sluice.batch`` span linked to its requests' spans, after a
        ``sluice.queue_wait`` span for each of them."""
        for pending in batch:  # its attempt span, the parent, says where it queued
            self._tracing.record_queue_wait(pending.trace, start_ns=pending.enqueued_ns)
        attributes: dict[str, str | int] = {
            **self._span_attributes,
            "sluice.batch.size": sum(p.rows for p in batch),
            "sluice.batch.requests": len(batch),
        }
        with self._tracing.batch_span([p.trace for p in batch], attributes):
            return await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> tuple[dict[str, Array], float, float]:
        t0 = self._clock()
        if len(batch) == 1:
            inputs = dict(batch[0].inputs)
        else:
            inputs = {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs
            }
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
        rows = sum(p.rows for p in batch)
        if self._batched:
            wrong = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows]
            if wrong:
                raise ExecutorError(
                    f"model {self.name} returned output(s) {', '.join(wrong)} whose first "
                    f"dimension is not the batch size {rows}"
                )
        return outputs, t1 - t0, t2 - t1

    def _execution_limit_s(self, batch: list[_Pending]) -> float:
        """How long a batch may run: until its last caller's deadline, at most the cap."""
        deadlines = [p.deadline for p in batch if p.deadline is not None]
        if len(deadlines) < len(batch):
            return self._max_execution_s
        return max(0.0, min(self._max_execution_s, max(deadlines) - self._clock()))

    def _deliver(self, batch: list[_Pending], outputs: dict[str, Array]) -> None:
        if len(batch) == 1:
            _resolve_result(batch[0].future, outputs)
            return
        offset = 0
        for pending in batch:
            stop = offset + pending.rows
            _resolve_result(pending.future, {n: a[offset:stop] for n, a in outputs.items()})
            offset = stop


def _resolve_result(future: asyncio.Future[dict[str, Array]], value: dict[str, Array]) -> None:
    if not future.done():
        future.set_result(value)


def _resolve_error(future: asyncio.Future[dict[str, Array]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
