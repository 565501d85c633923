"""Continuous (iteration-level) batching: many generations share one model, a step at a time.

One engine thread owns the model and its key/value cache. Each iteration it

1. retires sequences whose caller cancelled or whose deadline passed (so a caller that went
   away costs at most the step that was already running when it left),
2. lets waiting sequences join, within ``max_running_sequences`` and ``max_tokens_in_flight``
   (prompt + ``max_new_tokens`` are reserved on joining, so the cache never outgrows the
   limit), and prefills them: their first token goes out at once,
3. decodes one token for every running sequence in one forward pass, and
4. hands the step's chunks to the event loop in one call.

The event-loop side is one ``Generation`` per request (vLLM's per-request collector): an
async iterator of ``Chunk``. A reader that falls ``max_buffered_chunks`` behind pauses its
sequence (it keeps its cache and skips steps until the reader catches up), so a slow reader
never makes the server buffer without bound, and never slows the others.

Errors: library exceptions from a step are translated here (the executor boundary) and end
the sequences of that step; a sequence's own bad input ends only that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch

from sluice.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    ExecutorDeadError,
    ExecutorError,
    InvalidInputError,
    OverloadedError,
    PromptTooLongError,
    SluiceError,
)
from sluice.executors.faults import FaultConfig
from sluice.generation.causal_lm import CausalLM
from sluice.generation.generate import Chunk, FinishReason, SequenceOutput
from sluice.generation.kv_cache import SequenceCache
from sluice.generation.sampling import SamplingParams, TokenSampler, sample_many
from sluice.generation.tokenizer import Tokenizer
from sluice.threads import join_thread

log = logging.getLogger(__name__)

Clock = Callable[[], float]

_IDLE_WAIT_S = 1.0
"""Longest the idle engine sleeps before it looks at deadlines again."""


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_running_sequences: int
    max_tokens_in_flight: int
    max_waiting: int
    max_buffered_chunks: int
    pushback_ms: int


@dataclass(slots=True)
class SchedulerStats:
    """Counters written by the engine thread (read anywhere: plain ints)."""

    prefills: int = 0
    decode_steps: int = 0
    """Forward passes that decoded one token for each of the running sequences."""
    tokens_generated: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    max_steps_after_cancel: int = 0
    """Most decode steps any sequence took part in after its caller cancelled (at most the
    one that was running when the cancel came)."""
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class _End:
    reason: FinishReason | None
    error: SluiceError | None = None


@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    reserved_tokens: int
    fault: str
    handle: Generation
    cache: SequenceCache | None = None
    sampler: TokenSampler | None = None
    output: SequenceOutput | None = None
    last_token: int = 0
    sent: int = 0
    # Written by the event loop, read by the engine (plain values: no lock needed).
    taken: int = 0
    cancel_requested_at_step: int | None = None
    paused: bool = False
    hung: bool = False
    steps_since_cancel: int = field(default=0)


class Generation:
    """One request's stream of chunks (the caller's side). Iterate it; leaving it early
    (``cancel`` or ``aclose``, e.g. when the caller goes away) ends the sequence at the
    next step boundary."""

    def __init__(self, scheduler: ContinuousBatcher, *, prompt_tokens: int) -> None:
        self._scheduler = scheduler
        self._items: deque[Chunk | _End] = deque()
        self._wakeup = asyncio.Event()
        self._sequence: _Sequence | None = None
        self._ended = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Chunk:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if isinstance(item, _End):
            self._ended = True
            self.finish_reason = item.reason
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        self.completion_tokens += 1
        self.finish_reason = item.finish_reason
        sequence = self._sequence
        if sequence is not None:
            sequence.taken += 1
            if sequence.paused:
                self._scheduler.wake()
        return item

    @property
    def ended(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        """Stop generating (the sequence leaves at the next step boundary)."""
        sequence = self._sequence
        if sequence is not None and sequence.cancel_requested_at_step is None:
            sequence.cancel_requested_at_step = self._scheduler.stats.decode_steps
            self._scheduler.wake()

    async def aclose(self) -> None:
        if not self._ended:
            self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _push(self, item: Chunk | _End) -> None:
        self._items.append(item)
        self._wakeup.set()


class ContinuousBatcher:
    """Runs every generation of one model version (see the module doc)."""

    def __init__(
        self,
        lm: CausalLM,
        tokenizer: Tokenizer,
        *,
        name: str,
        limits: SchedulerLimits,
        faults: FaultConfig | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.name = name
        self.stats = SchedulerStats()
        self._limits = limits
        self._faults = faults
        self._fault_draw = random.Random(faults.seed if faults else None)
        self._clock = clock
        self._condition = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._tokens_in_flight = 0
        self._outbox: list[tuple[Generation, Chunk | _End]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def max_context(self) -> int:
        return self.lm.max_context

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the engine; generations still running end with UNAVAILABLE."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is not None:
            await join_thread(self._thread)
            self._thread = None

    def wake(self) -> None:
        with self._condition:
            self._condition.notify()

    # -- the caller's side (event loop) ---------------------------------------------------

    async def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids, exactly as the model will see them. A prompt with more
        bytes than the context could hold is refused before any tokenizing; a long one is
        tokenized off the event loop."""
        size = len(prompt) if prompt.isascii() else len(prompt.encode("utf-8"))
        bound = self.tokenizer.max_prompt_bytes(self.max_context)
        if size > bound:
            raise PromptTooLongError(
                model=self.name,
                prompt_bytes=size,
                max_prompt_bytes=bound,
                max_context=self.max_context,
            )
        return await self.tokenizer.encode_off_loop(prompt)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.max_context:
            raise ContextOverflowError(
                model=self.name,
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                max_context=self.max_context,
            )

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, deadline: float | None
    ) -> Generation:
        """Queue a generation; its chunks come through the returned ``Generation``."""
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty: send at least one token's worth of text")
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        handle = Generation(self, prompt_tokens=len(prompt_ids))
        sequence = _Sequence(
            prompt_ids=list(prompt_ids),
            params=params,
            deadline=deadline,
            reserved_tokens=len(prompt_ids) + params.max_new_tokens,
            fault=self._draw_fault(),
            handle=handle,
        )
        handle._sequence = sequence
        with self._condition:
            if self._closing:
                raise ExecutorError(f"model {self.name} is unloading")
            if len(self._waiting) >= self._limits.max_waiting and self._is_full():
                raise OverloadedError(
                    f"model {self.name}: {len(self._waiting)} generations are already waiting "
                    "to start; retry after the pushback",
                    retry_after_ms=self._limits.pushback_ms,
                )
            self._waiting.append(sequence)
            self.stats.waiting = len(self._waiting)
            self._condition.notify()
        return handle

    def _draw_fault(self) -> str:
        faults = self._faults
        if faults is None or faults.mode == "none":
            return "none"
        return faults.mode if self._fault_draw.random() < faults.probability else "none"

    def _is_full(self) -> bool:
        return len(self._running) >= self._limits.max_running_sequences

    # -- the engine (its own thread) ------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closing and not self._has_work():
                    self._condition.wait(self._idle_wait_s())
                    self._expire_waiting()
                if self._closing:
                    break
                joining = self._admit()
            try:
                self._step(joining)
            except Exception:  # a bug here must not leave every stream waiting forever
                log.exception("model %s: the generation engine failed a step", self.name)
                self._fail_running(ExecutorError(f"model {self.name}: internal engine error"))
        self._shut_down()

    def _has_work(self) -> bool:
        if self._waiting and not self._is_full():
            return True
        now = self._clock()
        return any(
            self._ready(s)
            or s.cancel_requested_at_step is not None
            or (s.deadline is not None and now >= s.deadline)
            for s in self._running
        )

    def _ready(self, sequence: _Sequence) -> bool:
        backlog = sequence.sent - sequence.taken
        sequence.paused = backlog >= self._limits.max_buffered_chunks
        return not sequence.paused and not sequence.hung

    def _idle_wait_s(self) -> float:
        deadlines = [s.deadline for s in (*self._waiting, *self._running) if s.deadline]
        if not deadlines:
            return _IDLE_WAIT_S
        return min(_IDLE_WAIT_S, max(0.0, min(deadlines) - self._clock()))

    def _expire_waiting(self) -> None:
        """Drop waiting sequences whose caller left or whose deadline passed (lock held)."""
        now = self._clock()
        for sequence in list(self._waiting):
            if sequence.cancel_requested_at_step is not None:
                self._waiting.remove(sequence)
                self._end(sequence, _End(FinishReason.CANCELLED))
            elif sequence.deadline is not None and now >= sequence.deadline:
                self._waiting.remove(sequence)
                self._end(sequence, _End(None, _deadline_error(sequence)))
        self.stats.waiting = len(self._waiting)
        self._flush()

    def _admit(self) -> list[_Sequence]:
        """Waiting sequences that join now (lock held)."""
        self._expire_waiting()
        joining: list[_Sequence] = []
        while self._waiting and len(self._running) + len(joining) < (
            self._limits.max_running_sequences
        ):
            sequence = self._waiting[0]
            crowded = (self._running or joining) and (
                self._tokens_in_flight + sequence.reserved_tokens
                > self._limits.max_tokens_in_flight
            )
            if crowded:
                break
            self._waiting.popleft()
            self._tokens_in_flight += sequence.reserved_tokens
            joining.append(sequence)
        self.stats.waiting = len(self._waiting)
        return joining

    def _step(self, joining: list[_Sequence]) -> None:
        self._retire()
        if joining:
            self._prefill(joining)
            self.stats.running = len(self._running)
            self._flush()  # first tokens go out now, not after the others' decode
        active = [
            s for s in self._running if s not in joining and s.cache is not None and self._ready(s)
        ]
        if active:
            self._decode(active)
        self.stats.running = len(self._running)
        self._flush()

    def _retire(self) -> None:
        now = self._clock()
        for sequence in list(self._running):
            if sequence.cancel_requested_at_step is not None:
                self.stats.max_steps_after_cancel = max(
                    self.stats.max_steps_after_cancel,
                    self.stats.decode_steps - sequence.cancel_requested_at_step,
                )
                self._leave(sequence, _End(FinishReason.CANCELLED))
            elif sequence.deadline is not None and now >= sequence.deadline:
                self._leave(sequence, _End(None, _deadline_error(sequence)))

    def _prefill(self, joining: list[_Sequence]) -> None:
        """Prefill the joining sequences in one forward pass; if that fails, one at a time,
        so a sequence that cannot run fails alone."""
        self._running.extend(joining)
        ready = [sequence for sequence in joining if not self._fault_hits(sequence)]
        if not ready:
            return
        try:
            logits, caches = self.lm.prefill_many([s.prompt_ids for s in ready])
        except (SluiceError, RuntimeError, ValueError) as exc:
            if len(ready) > 1:
                for sequence in ready:
                    self._prefill_alone(sequence)
                return
            error = (
                exc if isinstance(exc, SluiceError) else _backend_error(self.name, "prefill", exc)
            )
            self._leave(ready[0], _End(None, error))
            return
        for sequence, row, cache in zip(ready, logits, caches, strict=True):
            sequence.cache = cache
            self._first_token(sequence, row)

    def _prefill_alone(self, sequence: _Sequence) -> None:
        try:
            logits, sequence.cache = self.lm.prefill(sequence.prompt_ids)
        except SluiceError as exc:
            self._leave(sequence, _End(None, exc))
            return
        except (RuntimeError, ValueError) as exc:  # torch reports everything as these
            self._leave(sequence, _End(None, _backend_error(self.name, "prefill", exc)))
            return
        self._first_token(sequence, logits)

    def _first_token(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        sequence.sampler = TokenSampler(
            sequence.params,
            prompt_ids=sequence.prompt_ids,
            vocab_size=self.lm.config.vocab_size,
            device=str(self.lm.device),
        )
        sequence.output = SequenceOutput(
            self.tokenizer, sequence.params, prompt_ids=sequence.prompt_ids
        )
        self.stats.prefills += 1
        self._emit(sequence, sequence.sampler.sample(logits))

    def _decode(self, active: list[_Sequence]) -> None:
        steps = [(s.last_token, s.cache) for s in active if s.cache is not None]
        assert len(steps) == len(active)
        try:
            logits = self.lm.decode(steps)
        except (RuntimeError, ValueError, SluiceError) as exc:
            error = (
                exc if isinstance(exc, SluiceError) else _backend_error(self.name, "decode", exc)
            )
            for sequence in active:
                self._leave(sequence, _End(None, error))
            return
        self.stats.decode_steps += 1
        samplers = [s.sampler for s in active if s.sampler is not None]
        for sequence, token in zip(active, sample_many(samplers, logits), strict=True):
            self._emit(sequence, token)

    def _emit(self, sequence: _Sequence, token: int) -> None:
        assert sequence.output is not None
        chunk = sequence.output.add(token)
        sequence.last_token = token
        sequence.sent += 1
        self.stats.tokens_generated += 1
        self._outbox.append((sequence.handle, chunk))
        if chunk.finish_reason is not None:
            self.stats.finished += 1
            self._leave(sequence, _End(chunk.finish_reason))
        else:
            self._fault_hits(sequence)

    def _fault_hits(self, sequence: _Sequence) -> bool:
        """Apply an injected fault once the sequence has made its ``after_tokens``."""
        if sequence.fault == "none" or self._faults is None:
            return False
        if sequence.sent < self._faults.after_tokens:
            return False
        if sequence.fault == "fail":
            error = ExecutorError(f"injected fault: model {self.name} failed this generation")
            self._leave(sequence, _End(None, error))
            return True
        if sequence.fault == "dead":
            self._leave(sequence, _End(None, ExecutorDeadError("injected fault: dead backend")))
            return True
        if sequence.fault == "hang":
            sequence.hung = True
            return sequence.cache is None
        time.sleep(self._faults.delay_ms / 1000)  # "slow": this step takes longer
        return False

    def _leave(self, sequence: _Sequence, end: _End) -> None:
        if sequence in self._running:
            self._running.remove(sequence)
            self._tokens_in_flight -= sequence.reserved_tokens
        if sequence.cache is not None:
            sequence.cache.release()
            sequence.cache = None
        self._end(sequence, end)

    def _end(self, sequence: _Sequence, end: _End) -> None:
        if end.reason is FinishReason.CANCELLED:
            self.stats.cancelled += 1
        elif end.error is not None:
            self.stats.failed += 1
        self._outbox.append((sequence.handle, end))

    def _flush(self) -> None:
        """Hand this step's chunks to the event loop in one call."""
        if not self._outbox or self._loop is None:
            return
        outbox, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self._loop.call_soon_threadsafe(_deliver, outbox)

    def _fail_running(self, error: SluiceError) -> None:
        for sequence in list(self._running):
            self._leave(sequence, _End(None, error))
        self.stats.running = 0
        self._flush()

    def _shut_down(self) -> None:
        with self._condition:
            waiting, self._waiting = list(self._waiting), deque()
        error = ExecutorError(f"model {self.name} was unloaded while generating")
        for sequence in waiting:
            self._end(sequence, _End(None, error))
        self.stats.waiting = 0
        self._fail_running(error)


def _deliver(outbox: list[tuple[Generation, Chunk | _End]]) -> None:
    for handle, item in outbox:
        handle._push(item)


def _deadline_error(sequence: _Sequence) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the generation's deadline passed after {sequence.sent} of at most "
        f"{sequence.params.max_new_tokens} tokens"
    )


def _backend_error(name: str, stage: str, exc: Exception) -> ExecutorError:
    if isinstance(exc, torch.OutOfMemoryError):
        return ExecutorError(f"model {name}: out of device memory during {stage}; retry later")
    log.exception("model %s: %s failed", name, stage)
    return ExecutorError(f"model {name}: the backend failed during {stage}")
