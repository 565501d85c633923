"""The dynamic batcher's queue: requests waiting to run, and the choice of the next batch.

Requests are ordered by priority level (1 first), then by arrival; one that has waited the
priority age bound counts as the highest level (``Priorities.rank``), so no level starves.
The next batch is the first request in that order and every queued request of the same
signature (in that order), up to ``max_batch_size`` rows; with ``max_queue_delay_us`` the
queue may first wait a little for more (reaching a preferred size or the maximum ends the
wait). Each level may have its own queue bound and queue timeout (``QueuePolicy``); a full queue
makes room for a request by shedding the newest one of a less urgent level, if any.
Requests whose caller left, whose deadline passed or who waited past their level's queue
timeout are dropped here, before they run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sluice.batching.arithmetic import Signature
from sluice.clock import Clock
from sluice.errors import DeadlineExceededError, OverloadedError, SluiceError
from sluice.priority import Priorities
from sluice.repository import BatchingPolicy
from sluice.tensors import Array
from sluice.tracing import Context


class QueueObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def level_depth(self, level: int, depth: int) -> None: ...
    def shed(self, level: int) -> None: ...


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
    #: Priority level (1 is the most urgent; 0: the default level).
    level: int = 0
    #: When its level's queue timeout ends its wait (None: no timeout of its own).
    queue_deadline: float | None = None


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
        priorities: Priorities | None = None,
    ) -> None:
        self._name = name
        self._priorities = priorities or Priorities()
        self._depths: Counter[int] = Counter()
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
        """Queue a request, or shed it when the queue (or its level's share) is full."""
        level = pending.level = self._priorities.level(pending.level)
        policy = self._priorities.queue_policy(level)
        if len(self._queue) >= self._policy.max_queue_size and not self._evict_below(level):
            self._shed(level, f"{len(self._queue)} requests queued (the limit)")
        if policy.max_queue_size is not None and self._depths[level] >= policy.max_queue_size:
            self._shed(
                level,
                f"{self._depths[level]} requests of priority level {level} queued "
                "(that level's limit)",
            )
        if policy.timeout_s is not None:
            pending.queue_deadline = pending.enqueued_at + policy.timeout_s
        self._queue.append(pending)
        self._depths[level] += 1
        self._observer.level_depth(level, self._depths[level])
        self._observer.queue_depth(len(self._queue))
        self._arrived.set()

    def _evict_below(self, level: int) -> bool:
        """Make room in a full queue for a request of ``level``: shed the newest queued
        request of the least urgent level below it. False: none is below it."""
        victim = max(reversed(self._queue), key=lambda p: (p.level, p.enqueued_at))
        if victim.level <= level:
            return False
        self._queue.remove(victim)
        self._depths[victim.level] -= 1
        self._observer.level_depth(victim.level, self._depths[victim.level])
        self._observer.dropped("queue_full")
        self._observer.shed(victim.level)
        if not victim.future.done():
            victim.future.set_exception(
                OverloadedError(
                    f"model {self._name}'s queue is full and a more urgent request took this "
                    f"priority level {victim.level} request's place; retry after the "
                    "suggested back-off",
                    retry_after_ms=self._pushback_ms,
                )
            )
        return True

    def _shed(self, level: int, why: str) -> None:
        self._observer.dropped("queue_full")
        self._observer.shed(level)
        raise OverloadedError(
            f"model {self._name} has {why}; retry after the suggested back-off",
            retry_after_ms=self._pushback_ms,
        )

    def _show(self) -> None:
        """Report the queue's depth, in all and per level."""
        depths = Counter(p.level for p in self._queue)
        for level in depths.keys() | self._depths.keys():
            self._observer.level_depth(level, depths[level])
        self._depths = depths
        self._observer.queue_depth(len(self._queue))

    def _ordered(self) -> list[Pending]:
        """The queue in the order requests are taken: by level (aged ones count as the
        highest), then by arrival."""
        if len(self._queue) == self._depths[self._queue[0].level]:
            # One level queued: aging only moves the oldest ahead, so arrival order stands.
            return list(self._queue)
        now = self._clock()
        rank = self._priorities.rank
        return sorted(
            self._queue, key=lambda p: (rank(p.level, now - p.enqueued_at), p.enqueued_at)
        )

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
        self._show()

    async def _maybe_wait_for_more(self) -> None:
        delay_s = self._policy.max_queue_delay_us / 1e6
        if delay_s <= 0:
            return
        head = self._ordered()[0]
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
        """Pop the head and the queued requests that fit its batch, in the queue's order."""
        self._drop_gone()
        if not self._queue:
            return []
        ordered = self._ordered()
        head = ordered[0]
        batch: list[Pending] = []
        rows = 0
        for pending in ordered:
            fits = rows + pending.rows <= self._policy.max_batch_size
            if pending.signature == head.signature and fits and (self._batched or not batch):
                batch.append(pending)
                rows += pending.rows
        if len(batch) == len(self._queue):
            self._queue.clear()
        else:
            taken = {id(p) for p in batch}
            self._queue = deque(p for p in self._queue if id(p) not in taken)
        levels = {p.level for p in batch}
        for pending in batch:
            self._depths[pending.level] -= 1
        for level in levels:
            self._observer.level_depth(level, self._depths[level])
        self._observer.queue_depth(len(self._queue))
        return batch

    def _drop_gone(self) -> None:
        """Drop requests whose caller left or whose deadline passed while they queued."""
        if not self._queue:
            return
        now = self._clock()
        if not any(
            pending.future.done()
            or (pending.deadline is not None and now >= pending.deadline)
            or (pending.queue_deadline is not None and now >= pending.queue_deadline)
            for pending in self._queue
        ):
            return
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
            elif pending.queue_deadline is not None and now >= pending.queue_deadline:
                self._observer.dropped("deadline")
                pending.future.set_exception(
                    DeadlineExceededError(
                        f"the request waited {now - pending.enqueued_at:.3f}s in model "
                        f"{self._name}'s queue, past the queue timeout of priority level "
                        f"{pending.level}, before it could run"
                    )
                )
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._show()
