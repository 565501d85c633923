"""Which generations wait and which run in the continuous batcher, what each holds, and how
each one leaves.

A sequence waits until it may join, the most urgent priority level first (oldest first
within a level; one that has waited the priority age bound counts as the most urgent, so no
level starves): within ``max_running_sequences`` and, unless nothing else runs,
``max_tokens_in_flight`` (its prompt plus ``max_new_tokens`` are reserved when
it joins, so the cache never outgrows the limit). A sequence whose caller cancelled or whose
deadline passed leaves at the next step, waiting or running. When ``max_waiting`` are
already waiting, a new generation takes the place of the newest waiting one of a less urgent
level (which is shed), or is shed itself. A reader that fell
``max_buffered_chunks`` behind pauses its sequence (it keeps its cache and skips steps).

The engine thread owns this state; ``queue`` runs on the event loop, under the engine's
lock, as does everything that touches ``waiting``.
"""

from __future__ import annotations

from collections import deque

from sluice.clock import Clock
from sluice.domain import Chunk, FinishReason
from sluice.errors import DeadlineExceededError, OverloadedError, SluiceError
from sluice.generation.engine import SchedulerLimits, SchedulerStats
from sluice.generation.sequence import End, EngineSequence, Generation

_IDLE_WAIT_S = 1.0
"""Longest the idle engine sleeps before it looks at deadlines again."""


class Schedule:
    def __init__(
        self, *, name: str, limits: SchedulerLimits, stats: SchedulerStats, clock: Clock
    ) -> None:
        self._name = name
        self._limits = limits
        self._stats = stats
        self._clock = clock
        self.waiting: deque[EngineSequence] = deque()
        self.running: list[EngineSequence] = []
        self._tokens_in_flight = 0
        #: Items for the event loop, handed over once per step.
        self.outbox: list[tuple[Generation, Chunk | End]] = []

    @property
    def full(self) -> bool:
        return len(self.running) >= self._limits.max_running_sequences

    def queue(self, sequence: EngineSequence) -> None:
        """A new generation waits to join (lock held, on the event loop); when too many
        already wait, the newest waiting one of a less urgent level is shed for it, or,
        with none below it, the new one is."""
        sequence.priority = self._limits.priorities.level(sequence.priority)
        crowded = len(self.waiting) >= self._limits.max_waiting and self.full
        if crowded and not self._shed_below(sequence.priority):
            raise OverloadedError(
                f"model {self._name}: {len(self.waiting)} generations are already waiting "
                "to start; retry after the pushback",
                retry_after_ms=self._limits.pushback_ms,
            )
        sequence.queued_at = self._clock()
        self.waiting.append(sequence)
        self._stats.waiting = len(self.waiting)

    def _shed_below(self, level: int) -> bool:
        """End the newest waiting generation of the least urgent level below ``level``
        (its caller gets UNAVAILABLE + pushback); False when none waits below it. Runs on
        the event loop, so the ending is handed to its stream directly, not via the outbox
        the engine thread fills."""
        if not self.waiting:
            return False
        victim = max(reversed(self.waiting), key=lambda s: (s.priority, s.queued_at))
        if victim.priority <= level:
            return False
        self.waiting.remove(victim)
        victim.handle.push(
            End(
                None,
                OverloadedError(
                    f"model {self._name}: a more urgent generation took this priority level "
                    f"{victim.priority} generation's place in the full waiting queue; retry "
                    "after the pushback",
                    retry_after_ms=self._limits.pushback_ms,
                ),
            )
        )
        return True

    def has_work(self) -> bool:
        if self.waiting and not self.full:
            return True
        now = self._clock()
        return any(
            self.ready(s)
            or s.cancel_requested_at_step is not None
            or (s.deadline is not None and now >= s.deadline)
            for s in self.running
        )

    def ready(self, sequence: EngineSequence) -> bool:
        """Whether a running sequence takes part in the next decode step (its reader is not
        too far behind)."""
        backlog = sequence.sent - sequence.taken
        sequence.paused = backlog >= self._limits.max_buffered_chunks
        return not sequence.paused

    def idle_wait_s(self) -> float:
        deadlines = [s.deadline for s in (*self.waiting, *self.running) if s.deadline]
        if not deadlines:
            return _IDLE_WAIT_S
        return min(_IDLE_WAIT_S, max(0.0, min(deadlines) - self._clock()))

    def expire_waiting(self) -> None:
        """Drop waiting sequences whose caller left or whose deadline passed (lock held)."""
        now = self._clock()
        for sequence in list(self.waiting):
            if sequence.cancel_requested_at_step is not None:
                self.waiting.remove(sequence)
                self.end(sequence, End(FinishReason.CANCELLED))
            elif sequence.deadline is not None and now >= sequence.deadline:
                self.waiting.remove(sequence)
                self.end(sequence, End(None, _deadline_error(sequence)))
        self._stats.waiting = len(self.waiting)

    def admit(self) -> list[EngineSequence]:
        """Waiting sequences that join now (lock held); they run from now on."""
        self.expire_waiting()
        joining: list[EngineSequence] = []
        now = self._clock()
        rank = self._limits.priorities.rank
        ordered = sorted(
            self.waiting, key=lambda s: (rank(s.priority, now - s.queued_at), s.queued_at)
        )
        for sequence in ordered:
            if len(self.running) + len(joining) >= self._limits.max_running_sequences:
                break
            crowded = (self.running or joining) and (
                self._tokens_in_flight + sequence.reserved_tokens
                > self._limits.max_tokens_in_flight
            )
            if crowded:
                break
            self.waiting.remove(sequence)
            self._tokens_in_flight += sequence.reserved_tokens
            joining.append(sequence)
        self._stats.waiting = len(self.waiting)
        return joining

    def retire(self) -> None:
        """Running sequences whose caller cancelled or whose deadline passed leave."""
        now = self._clock()
        for sequence in list(self.running):
            if sequence.cancel_requested_at_step is not None:
                self._stats.max_steps_after_cancel = max(
                    self._stats.max_steps_after_cancel,
                    self._stats.decode_steps - sequence.cancel_requested_at_step,
                )
                self.leave(sequence, End(FinishReason.CANCELLED))
            elif sequence.deadline is not None and now >= sequence.deadline:
                self.leave(sequence, End(None, _deadline_error(sequence)))

    def send(self, sequence: EngineSequence, chunk: Chunk) -> None:
        """A chunk for the sequence's reader; a finishing chunk ends the sequence."""
        sequence.sent += 1
        self._stats.tokens_generated += 1
        self.outbox.append((sequence.handle, chunk))
        if chunk.finish_reason is not None:
            self._stats.finished += 1
            self.leave(sequence, End(chunk.finish_reason))

    def leave(self, sequence: EngineSequence, end: End) -> None:
        """The sequence ends: it gives back its reserved tokens and its cache rows."""
        if sequence in self.running:
            self.running.remove(sequence)
            self._tokens_in_flight -= sequence.reserved_tokens
        if sequence.cache is not None:
            sequence.cache.release()
            sequence.cache = None
        self.end(sequence, end)

    def end(self, sequence: EngineSequence, end: End) -> None:
        if end.reason is FinishReason.CANCELLED:
            self._stats.count_cancelled()
        elif end.error is not None:
            self._stats.failed += 1
        self.outbox.append((sequence.handle, end))

    def fail_running(self, error: SluiceError) -> None:
        for sequence in list(self.running):
            self.leave(sequence, End(None, error))
        self._stats.running = 0

    def fail_waiting(self, error: SluiceError) -> None:
        """End every waiting sequence (lock held): the engine is shutting down."""
        waiting, self.waiting = list(self.waiting), deque()
        for sequence in waiting:
            self.end(sequence, End(None, error))
        self._stats.waiting = 0

    def take_outbox(self) -> list[tuple[Generation, Chunk | End]]:
        outbox, self.outbox = self.outbox, []
        return outbox


def _deadline_error(sequence: EngineSequence) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the generation's deadline passed after {sequence.sent} of at most "
        f"{sequence.params.max_new_tokens} tokens"
    )
