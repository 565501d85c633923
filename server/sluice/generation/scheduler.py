"""Continuous (iteration-level) batching: many generations share one model, a step at a time.

One engine thread owns the model and its key/value cache. Each iteration it

1. retires sequences whose caller cancelled or whose deadline passed (so a caller that went
   away costs at most the step that was already running when it left),
2. lets waiting sequences join (``schedule``: most urgent priority level first, oldest first
   within a level, aged ones first; within ``max_running_sequences`` and
   ``max_tokens_in_flight``),
3. runs one forward pass that decodes one token for every running sequence and prefills the
   joining ones (``CausalLM.step``: the weights are read once for both, so a sequence
   joining costs the others a few more tokens in their pass, not a pass of its own; the
   joining sequences' first tokens come out of that pass), and
4. hands the step's chunks to the event loop in one call.

The event-loop side is one ``Generation`` per request (``sequence``): an async iterator of
``Chunk``. A reader that falls ``max_buffered_chunks`` behind pauses its sequence (it keeps
its cache and skips steps until the reader catches up), so a slow reader never makes the
server buffer without bound, and never slows the others.

Errors: library exceptions from a step are translated here (the executor boundary) and end
the sequences of that step; a sequence's own bad input ends only that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence

import torch

from sluice.clock import Clock
from sluice.domain import SamplingParams
from sluice.errors import ExecutorError, InvalidInputError, PromptTooLongError, SluiceError
from sluice.generation.causal_lm import CausalLM
from sluice.generation.engine import GenerationEngine, SchedulerLimits, SchedulerStats
from sluice.generation.generate import SequenceOutput
from sluice.generation.sampling import TokenSampler, sample_many
from sluice.generation.schedule import Schedule
from sluice.generation.sequence import End, EngineSequence, Generation, deliver
from sluice.generation.tokenizer import Tokenizer
from sluice.threads import join_thread

__all__ = ["ContinuousBatcher", "Generation", "SchedulerLimits", "SchedulerStats"]

log = logging.getLogger(__name__)


class ContinuousBatcher(GenerationEngine):
    """Runs every generation of one model version (see the module doc)."""

    def __init__(
        self,
        lm: CausalLM,
        tokenizer: Tokenizer,
        *,
        name: str,
        limits: SchedulerLimits,
        clock: Clock = time.monotonic,
    ) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.name = name
        self._stats = SchedulerStats()
        self._condition = threading.Condition()
        self._schedule = Schedule(name=name, limits=limits, stats=self._stats, clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def max_context(self) -> int:
        return self.lm.max_context

    @property
    def max_prompt_bytes(self) -> int:
        return self.tokenizer.max_prompt_bytes(self.max_context)

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
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

    async def encode(self, prompt: str) -> list[int]:
        """A prompt with more bytes than the context could hold is refused before any
        tokenizing; a long one is tokenized off the event loop."""
        size = len(prompt) if prompt.isascii() else len(prompt.encode("utf-8"))
        bound = self.max_prompt_bytes
        if size > bound:
            raise PromptTooLongError(
                model=self.name,
                prompt_bytes=size,
                max_prompt_bytes=bound,
                max_context=self.max_context,
            )
        return await self.tokenizer.encode_off_loop(prompt)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None,
        priority: int = 0,
    ) -> Generation:
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty: send at least one token's worth of text")
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        handle = Generation(prompt_tokens=len(prompt_ids), stats=self._stats, wake=self.wake)
        sequence = EngineSequence(
            prompt_ids=list(prompt_ids),
            params=params,
            deadline=deadline,
            reserved_tokens=len(prompt_ids) + params.max_new_tokens,
            handle=handle,
            priority=priority,
        )
        handle.attach(sequence)
        with self._condition:
            if self._closing:
                raise ExecutorError(f"model {self.name} is unloading")
            self._schedule.queue(sequence)
            self._condition.notify()
        return handle

    # -- the engine (its own thread) ------------------------------------------------------

    def _run(self) -> None:
        schedule = self._schedule
        while True:
            with self._condition:
                while not self._closing and not schedule.has_work():
                    self._condition.wait(schedule.idle_wait_s())
                    schedule.expire_waiting()
                    self._flush()
                if self._closing:
                    break
                joining = schedule.admit()
            try:
                self._step(joining)
            except Exception:  # a bug here must not leave every stream waiting forever
                log.exception("model %s: the generation engine failed a step", self.name)
                schedule.fail_running(ExecutorError(f"model {self.name}: internal engine error"))
                self._flush()
        self._shut_down()

    def _step(self, joining: list[EngineSequence]) -> None:
        schedule = self._schedule
        schedule.retire()
        active = [s for s in schedule.running if s.cache is not None and schedule.ready(s)]
        schedule.running.extend(joining)
        if joining:
            self._join(joining, active)
        elif active:
            self._decode(active)
        self._stats.running = len(schedule.running)
        self._flush()

    def _join(self, joining: list[EngineSequence], active: list[EngineSequence]) -> None:
        """Prefill the joining sequences in the running ones' decode pass (one pass reads
        the weights once for both); if that pass fails, prefill and decode apart, so a
        failure lands only on the sequences that cause it."""
        steps = [(s.last_token, s.cache) for s in active if s.cache is not None]
        try:
            decoded, prefilled, caches = self.lm.step(steps, [s.prompt_ids for s in joining])
        except (SluiceError, RuntimeError, ValueError):
            self._prefill(joining)
            if active:
                self._decode(active)
            return
        for sequence, cache in zip(joining, caches, strict=True):
            sequence.cache = cache
            self._start(sequence)
        if active:
            self._stats.decode_steps += 1
        self._sample([*joining, *active], torch.cat([prefilled, decoded]))

    def _prefill(self, joining: list[EngineSequence]) -> None:
        """Prefill the joining sequences in one forward pass; if that fails, one at a time,
        so a sequence that cannot run fails alone."""
        try:
            logits, caches = self.lm.prefill_many([s.prompt_ids for s in joining])
        except (SluiceError, RuntimeError, ValueError) as exc:
            if len(joining) > 1:
                for sequence in joining:
                    self._prefill_alone(sequence)
                return
            self._schedule.leave(joining[0], End(None, self._backend_error("prefill", exc)))
            return
        for sequence, cache in zip(joining, caches, strict=True):
            sequence.cache = cache
            self._start(sequence)
        self._sample(joining, logits)

    def _prefill_alone(self, sequence: EngineSequence) -> None:
        try:
            logits, sequence.cache = self.lm.prefill(sequence.prompt_ids)
        except (SluiceError, RuntimeError, ValueError) as exc:  # torch reports these
            self._schedule.leave(sequence, End(None, self._backend_error("prefill", exc)))
            return
        self._start(sequence)
        self._sample([sequence], logits[None])

    def _start(self, sequence: EngineSequence) -> None:
        """A prefilled sequence gets its sampler and its output."""
        sequence.sampler = TokenSampler(
            sequence.params,
            prompt_ids=sequence.prompt_ids,
            vocab_size=self.lm.config.vocab_size,
            device=str(self.lm.device),
        )
        sequence.output = SequenceOutput(
            self.tokenizer, sequence.params, prompt_ids=sequence.prompt_ids
        )
        self._stats.prefills += 1

    def _decode(self, active: list[EngineSequence]) -> None:
        steps = [(s.last_token, s.cache) for s in active if s.cache is not None]
        assert len(steps) == len(active)
        try:
            logits = self.lm.decode(steps)
        except (RuntimeError, ValueError, SluiceError) as exc:
            error = self._backend_error("decode", exc)
            for sequence in active:
                self._schedule.leave(sequence, End(None, error))
            return
        self._stats.decode_steps += 1
        self._sample(active, logits)

    def _sample(self, sequences: list[EngineSequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token (row ``i`` of ``logits`` is ``sequences[i]``'s)
        and send it."""
        samplers = [s.sampler for s in sequences if s.sampler is not None]
        for sequence, token in zip(sequences, sample_many(samplers, logits), strict=True):
            self._emit(sequence, token)

    def _emit(self, sequence: EngineSequence, token: int) -> None:
        assert sequence.output is not None
        sequence.last_token = token
        self._schedule.send(sequence, sequence.output.add(token))

    def _flush(self) -> None:
        """Hand this step's chunks to the event loop in one call."""
        if not self._schedule.outbox or self._loop is None:
            return
        outbox = self._schedule.take_outbox()
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self._loop.call_soon_threadsafe(deliver, outbox)

    def _shut_down(self) -> None:
        error = ExecutorError(f"model {self.name} was unloaded while generating")
        with self._condition:
            self._schedule.fail_waiting(error)
        self._schedule.fail_running(error)
        self._flush()

    def _backend_error(self, stage: str, exc: Exception) -> SluiceError:
        """A step's error as the stream reports it: ours as it is, torch's translated."""
        if isinstance(exc, SluiceError):
            return exc
        if isinstance(exc, torch.OutOfMemoryError):
            return ExecutorError(
                f"model {self.name}: out of device memory during {stage}; retry later"
            )
        log.exception("model %s: %s failed", self.name, stage)
        return ExecutorError(f"model {self.name}: the backend failed during {stage}")
