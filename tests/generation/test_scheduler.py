"""The continuous batcher on the bundled model: exact tokens whatever joins or leaves,
cancellation within one step, bounded buffering, deadlines, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import torch

from sluice.app import EXAMPLE_REPOSITORY
from sluice.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    ExecutorError,
    InvalidInputError,
    OverloadedError,
)
from sluice.executors.faults import FaultConfig, FaultyEngine
from sluice.generation.causal_lm import CausalLM
from sluice.generation.generate import FinishReason, generate
from sluice.generation.kv_cache import SequenceCache
from sluice.generation.sampling import SamplingParams
from sluice.generation.scheduler import ContinuousBatcher, Generation, SchedulerLimits
from sluice.generation.tokenizer import Tokenizer
from tests.conftest import FakeClock

TINY = EXAMPLE_REPOSITORY / "tiny_llama" / "1"

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl named Sue went to the park with her mom and",
    "Tom",
    "The sun was warm and the birds",
    "She had a red ball. She",
]


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    return CausalLM.load(TINY)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TINY)


def limits(**overrides: int) -> SchedulerLimits:
    values = {
        "max_running_sequences": 8,
        "max_tokens_in_flight": 100_000,
        "max_waiting": 64,
        "max_buffered_chunks": 1000,
        "pushback_ms": 50,
    }
    values.update(overrides)
    return SchedulerLimits(**values)


@pytest.fixture
async def start(
    lm: CausalLM, tokenizer: Tokenizer
) -> AsyncIterator[Callable[..., ContinuousBatcher]]:
    started: list[ContinuousBatcher] = []

    def make(*, clock: Callable[[], float] | None = None, **kw: int) -> ContinuousBatcher:
        batcher = ContinuousBatcher(
            lm,
            tokenizer,
            name="tiny_llama/1",
            limits=limits(**kw),
            clock=clock or FakeClock(),
        )
        batcher.start(asyncio.get_running_loop())
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.close()
    assert lm.live_sequences == 0, "every sequence gives its cache rows back"


def reference(lm: CausalLM, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> list[int]:
    return [chunk.token_id for chunk in generate(lm, tokenizer, tokenizer.encode(prompt), params)]


async def collect(stream: Generation) -> list[int]:
    return [chunk.token_id async for chunk in stream]


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for the engine thread to reach a state."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def test_batched_greedy_tokens_equal_single_runs_as_sequences_join_and_leave(
    start: Callable[..., ContinuousBatcher], lm: CausalLM, tokenizer: Tokenizer
) -> None:
    cases = [
        (prompt, SamplingParams(max_new_tokens=n))
        for prompt, n in zip(PROMPTS, [40, 7, 25, 60, 3, 18], strict=True)
    ]
    expected = [reference(lm, tokenizer, prompt, params) for prompt, params in cases]
    batcher = start()

    async def run(index: int) -> list[int]:
        # Staggered arrivals: later sequences join while earlier ones are decoding.
        await until(lambda: batcher.stats.tokens_generated >= 5 * index)
        prompt, params = cases[index]
        return await collect(batcher.submit(tokenizer.encode(prompt), params, deadline=None))

    got = await asyncio.gather(*(run(i) for i in range(len(cases))))
    assert got == expected
    assert batcher.stats.finished == len(cases)
    assert batcher.stats.decode_steps < sum(len(tokens) for tokens in expected), (
        "sequences shared decode steps"
    )


async def test_seeded_sampling_is_the_same_batched_or_alone(
    start: Callable[..., ContinuousBatcher], lm: CausalLM, tokenizer: Tokenizer
) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    alone = reference(lm, tokenizer, PROMPTS[0], params)
    batcher = start()
    streams = [
        batcher.submit(tokenizer.encode(PROMPTS[0]), params, deadline=None),
        batcher.submit(
            tokenizer.encode(PROMPTS[2]), SamplingParams(max_new_tokens=30), deadline=None
        ),
    ]
    together = await asyncio.gather(*(collect(s) for s in streams))
    assert together[0] == alone


async def test_a_cancelled_sequence_leaves_within_one_step_and_the_others_go_on(
    start: Callable[..., ContinuousBatcher], lm: CausalLM, tokenizer: Tokenizer
) -> None:
    batcher = start()
    keep_params = SamplingParams(max_new_tokens=50)
    keep = batcher.submit(tokenizer.encode(PROMPTS[1]), keep_params, deadline=None)
    doomed = batcher.submit(
        tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200), deadline=None
    )
    seen = [await anext(doomed) for _ in range(3)]
    doomed.cancel()
    rest = await collect(doomed)
    assert doomed.finish_reason is FinishReason.CANCELLED
    assert len(seen) + len(rest) < 200
    assert batcher.stats.cancelled == 1
    assert batcher.stats.max_steps_after_cancel <= 1
    assert await collect(keep) == reference(lm, tokenizer, PROMPTS[1], keep_params)


async def test_a_reader_that_does_not_read_pauses_its_sequence_at_the_buffer_limit(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    batcher = start(max_buffered_chunks=4)
    idle = batcher.submit(
        tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=100), deadline=None
    )
    busy = batcher.submit(
        tokenizer.encode(PROMPTS[3]), SamplingParams(max_new_tokens=40), deadline=None
    )
    assert len(await collect(busy)) == 40, "a paused neighbour does not hold the others back"
    assert batcher.stats.tokens_generated == 40 + 4, "the idle stream holds exactly its buffer"
    assert len(await collect(idle)) == 100, "reading resumes the paused sequence"


async def test_a_deadline_ends_a_running_generation_with_its_partial_tokens(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    clock = FakeClock()
    batcher = start(clock=clock)
    stream = batcher.submit(
        tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200), deadline=clock.now + 5
    )
    got = [await anext(stream) for _ in range(2)]
    clock.advance(10)
    with pytest.raises(DeadlineExceededError, match="deadline passed after"):
        async for chunk in stream:
            got.append(chunk)
    assert 2 <= len(got) < 200


async def test_waiting_generations_are_bounded_and_shed_with_pushback(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    batcher = start(max_running_sequences=1, max_waiting=1, max_buffered_chunks=1)
    ids = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=50)
    running = batcher.submit(ids, params, deadline=None)
    await anext(running)  # it runs (and, unread, pauses)
    waiting = batcher.submit(ids, params, deadline=None)
    with pytest.raises(OverloadedError) as shed:
        batcher.submit(ids, params, deadline=None)
    assert shed.value.retry_after_ms == 50
    running.cancel()
    assert len(await collect(waiting)) == 50


async def test_tokens_in_flight_limit_holds_sequences_back_until_room_frees(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=20)
    batcher = start(max_tokens_in_flight=len(ids) + 20)
    first, second = (batcher.submit(ids, params, deadline=None) for _ in range(2))
    await anext(first)
    assert batcher.stats.running == 1 and batcher.stats.waiting == 1
    assert len(await collect(first)) == 19
    assert len(await collect(second)) == 20


async def test_bad_requests_fail_alone(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    batcher = start()
    with pytest.raises(ContextOverflowError, match=r"257 tokens do not fit its context of 256"):
        batcher.submit(
            tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=253), deadline=None
        )
    with pytest.raises(InvalidInputError, match="the prompt is empty"):
        batcher.submit([], SamplingParams(), deadline=None)
    fine = batcher.submit(
        tokenizer.encode(PROMPTS[3]), SamplingParams(max_new_tokens=5), deadline=None
    )
    assert len(await collect(fine)) == 5


async def test_injected_faults_fail_generations_before_or_after_tokens(
    start: Callable[..., ContinuousBatcher], tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPTS[0])
    before = FaultyEngine(start(), FaultConfig(mode="fail"))
    with pytest.raises(ExecutorError, match="injected fault"):
        await collect(before.submit(ids, SamplingParams(max_new_tokens=5), deadline=None))
    after = FaultyEngine(start(), FaultConfig(mode="fail", after_tokens=3))
    stream = after.submit(ids, SamplingParams(max_new_tokens=20), deadline=None)
    got = [await anext(stream) for _ in range(3)]
    with pytest.raises(ExecutorError):
        await anext(stream)
    assert len(got) == 3


async def test_every_architecture_batches_to_exactly_its_single_runs(
    random_lm: CausalLM, tokenizer: Tokenizer
) -> None:
    """Random-initialised Llama, Qwen2, Mistral and GPT-2 configs: greedy generation in the
    continuous batcher, sequences of different lengths joining and leaving mid-way, gives the
    tokens of each sequence run alone."""
    vocab = random_lm.config.vocab_size
    prompts = [
        [(7 * i + 3 * k) % vocab for k in range(length)]
        for i, length in enumerate([5, 17, 2, 40, 9])
    ]
    budgets = [30, 6, 45, 12, 25]
    expected = [
        [c.token_id for c in generate(random_lm, tokenizer, ids, SamplingParams(max_new_tokens=n))]
        for ids, n in zip(prompts, budgets, strict=True)
    ]
    batcher = ContinuousBatcher(
        random_lm, tokenizer, name="random", limits=limits(), clock=FakeClock()
    )
    batcher.start(asyncio.get_running_loop())
    try:

        async def run(index: int) -> list[int]:
            made_before = sum(len(tokens) for tokens in expected[:index])
            await until(lambda: batcher.stats.tokens_generated >= min(4 * index, made_before))
            stream = batcher.submit(
                prompts[index], SamplingParams(max_new_tokens=budgets[index]), deadline=None
            )
            return await collect(stream)

        got = await asyncio.gather(*(run(i) for i in range(len(prompts))))
    finally:
        await batcher.close()
    assert got == expected
    assert random_lm.live_sequences == 0


class _FailingOnce(CausalLM):
    """The bundled model with a bug injected into one decode step."""

    fail_next = False

    def decode(self, steps: Sequence[tuple[int, SequenceCache]]) -> torch.Tensor:
        if self.fail_next:
            self.fail_next = False
            raise KeyError("a bug in a decode step")
        return super().decode(steps)


async def test_an_unexpected_engine_error_fails_the_running_streams_and_the_engine_goes_on(
    tokenizer: Tokenizer,
) -> None:
    lm = _FailingOnce.load(TINY)
    batcher = ContinuousBatcher(lm, tokenizer, name="tiny", limits=limits(), clock=FakeClock())
    batcher.start(asyncio.get_running_loop())
    try:
        ids = tokenizer.encode(PROMPTS[0])
        stream = batcher.submit(ids, SamplingParams(max_new_tokens=50), deadline=None)
        await anext(stream)
        lm.fail_next = True
        with pytest.raises(ExecutorError, match="internal engine error"):
            await collect(stream)
        after = batcher.submit(ids, SamplingParams(max_new_tokens=5), deadline=None)
        assert len(await collect(after)) == 5
    finally:
        await batcher.close()
    assert lm.live_sequences == 0
