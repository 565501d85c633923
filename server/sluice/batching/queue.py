"""The dynamic batcher's queue: requests waiting to run, and the choice of the next batch.

The next batch is the oldest request and every queued request of the same signature (in
arrival order), up to ``max_batch_size`` rows; with ``max_queue_delay_us`` the queue may
first wait a little for more (reaching a preferred size or the maximum ends the wait).
Requests whose caller left or whose deadline passed are dropped here, before they run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sluice.batching.arithmetic import Signature
from sluice.clock import Clock
from sluice.errors import DeadlineExceededError, OverloadedError, SluiceError
from sluice.repository import BatchingPolicy
from sluice.tensors import Array
from sluice.tracing import Context


class QueueObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def dropped(self, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class Pending:
    """One queued request and the future its caller waits on."""

    inputs: Mapping[str, Array]
    rows: int
    signature: Signature
    deadline: float | None
    enqueued_at: float
    future: asyncio.Future[dict[str, Array]] = field(repr=False)
    #: The caller's trace context and enqueue time (wall clock, ns) while tracing is on.
    trace: Context | None = field(default=None, repr=False)
    enqueued_ns: int = 0


class BatchQueue:
    def __init__(
        self,
        *,
        name: str,
        policy: BatchingPolicy,
        batched: bool,
        observer: QueueObserver,
        clock: Clock,
        pushback_ms: int,
    ) -> None:
        self._name = name
        self._policy = policy
        self._batched = batched
        self._observer = observer
        self._clock = clock
        self._pushback_ms = pushback_ms
        self._queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, pending: Pending) -> None:
        """Queue a request, or shed it when the queue is full."""
        if len(self._queue) >= self._policy.max_queue_size:
            self._observer.dropped("queue_full")
            raise OverloadedError(
                f"model {self._name} has {len(self._queue)} requests queued (the limit); "
                "retry after the suggested back-off",
                retry_after_ms=self._pushback_ms,
            )
        self._queue.append(pending)
        self._observer.queue_depth(len(self._queue))
        self._arrived.set()

    async def next_batch(self) -> list[Pending]:
        """The next batch to run (waits until there is one)."""
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

    def fail_all(self, error: SluiceError) -> None:
        """End every queued request with ``error`` (its version is unloading)."""
        while self._queue:
            future = self._queue.popleft().future
            if not future.done():
                future.set_exception(error)
        self._observer.queue_depth(0)

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

    def _ready_to_go(self, head: Pending) -> bool:
        rows = sum(p.rows for p in self._queue if p.signature == head.signature)
        return rows >= self._policy.max_batch_size or rows in self._policy.preferred_batch_sizes

    def _take(self) -> list[Pending]:
        """Pop the head and the queued requests that fit its batch, in arrival order."""
        self._drop_gone()
        if not self._queue:
            return []
        head = self._queue[0]
        batch: list[Pending] = []
        rest: deque[Pending] = deque()
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
        kept: deque[Pending] = deque()
        for pending in self._queue:
            if pending.future.done():
                self._observer.dropped("cancelled")
            elif pending.deadline is not None and now >= pending.deadline:
                self._observer.dropped("deadline")
                pending.future.set_exception(
                    DeadlineExceededError(
                        f"the deadline passed after {now - pending.enqueued_at:.3f}s in "
                        f"model {self._name}'s queue, before the request could run"
                    )
                )
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._observer.queue_depth(len(kept))
