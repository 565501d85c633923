"""Urgency classes: a request's priority level (Triton's ``priority`` parameter or the
``x-sluice-priority`` metadata), queues that take the most urgent first with an age bound,
per-level queue policies, and admission that sheds the lowest levels first. Queue and
scheduler order are unit-tested with an injected clock; the rest runs over a real server
with a fake backend whose timing the tests control."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from sluice.admission import AdmissionController
from sluice.batching import arithmetic
from sluice.batching.queue import BatchQueue, Pending
from sluice.domain import SamplingParams
from sluice.errors import DeadlineExceededError, InvalidInputError, OverloadedError
from sluice.generation.engine import SchedulerLimits, SchedulerStats
from sluice.generation.schedule import Schedule
from sluice.generation.sequence import EngineSequence, Generation
from sluice.metrics import Metrics
from sluice.priority import Priorities
from sluice.repository import BatchingPolicy
from sluice.settings import AdmissionSettings, PrioritySettings, Settings, load_settings
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import REPO_ROOT, FakeClock, RunningServer, StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository
from tests.test_scheduling import occupy, rows, wait_queued

INTERACTIVE, BACKGROUND, BATCH = 1, 2, 3

# -- parsing ------------------------------------------------------------------------------


def test_levels_come_from_the_parameter_the_metadata_or_the_default() -> None:
    priorities = Priorities()
    assert priorities.resolve() == BACKGROUND  # the default level
    assert priorities.resolve(parameter=0) == BACKGROUND  # Triton: 0 is the default
    assert priorities.resolve(parameter=1) == INTERACTIVE
    assert priorities.resolve(metadata="batch") == BATCH
    assert priorities.resolve(metadata=" interactive ") == INTERACTIVE
    assert priorities.resolve(metadata="3") == BATCH
    assert priorities.resolve(metadata="0") == BACKGROUND
    # The request's own parameter wins over the call's metadata.
    assert priorities.resolve(parameter=1, metadata="batch") == INTERACTIVE


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"parameter": 4}, "parameter 'priority' is 4: priority levels run from 1 (highest) to 3"),
        ({"metadata": "9"}, "metadata 'x-sluice-priority' is 9: priority levels run from 1"),
        ({"metadata": "urgent"}, "classes background=2, batch=3, interactive=1"),
        ({"metadata": "-1"}, "neither a level nor a class"),
        ({"metadata": "\u00b2"}, "neither a level nor a class"),  # a digit int() refuses
    ],
)
def test_bad_levels_and_unknown_classes_name_the_valid_ones(
    given: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        Priorities().resolve(**given)
    assert expected in info.value.message


def test_a_huge_metadata_value_is_clipped_in_the_message() -> None:
    with pytest.raises(InvalidInputError) as info:
        Priorities().resolve(metadata="x" * 10_000)
    assert len(info.value.message) < 400


@pytest.mark.parametrize(
    "section",
    [
        {"default_level": 4},
        {"classes": {"interactive": 0}},
        {"classes": {"batch": 7}},
        {"queue_policies": {5: {"max_queue_size": 1}}},
        {"levels": 5, "default_level": 1, "admission_reserve_per_level": 0.25},
    ],
)
def test_settings_refuse_levels_that_do_not_exist(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({"priority": section})


# -- the batcher's queue (injected clock) ---------------------------------------------------


class Observer:
    def __init__(self) -> None:
        self.depths: dict[int, int] = {}
        self.shed_levels: Counter[int] = Counter()

    def queue_depth(self, depth: int) -> None:
        self.total = depth

    def dropped(self, reason: str) -> None:
        pass

    def level_depth(self, level: int, depth: int) -> None:
        self.depths[level] = depth

    def shed(self, level: int) -> None:
        self.shed_levels[level] += 1


def make_queue(
    clock: FakeClock, *, max_batch_size: int = 1, **priority: Any
) -> tuple[BatchQueue, Observer]:
    observer = Observer()
    queue = BatchQueue(
        name="fake/1",
        policy=BatchingPolicy(
            max_batch_size=max_batch_size,
            max_queue_delay_us=0,
            preferred_batch_sizes=(),
            max_queue_size=16,
        ),
        batched=True,
        observer=observer,
        clock=clock,
        pushback_ms=50,
        priorities=Priorities(PrioritySettings.model_validate(priority)),
    )
    return queue, observer


def put(queue: BatchQueue, clock: FakeClock, level: int, value: float) -> Pending:
    inputs = {"x": rows(value)}
    pending = Pending(
        inputs=inputs,
        rows=1,
        signature=arithmetic.signature(inputs, batched=True),
        deadline=None,
        enqueued_at=clock(),
        future=asyncio.get_running_loop().create_future(),
        level=level,
    )
    queue.put(pending)
    return pending


def values(batch: list[Pending]) -> list[float]:
    return [float(p.inputs["x"][0, 0]) for p in batch]


async def test_the_queue_takes_the_most_urgent_first_then_the_oldest() -> None:
    clock = FakeClock()
    queue, observer = make_queue(clock)
    for level, value in ((BATCH, 1), (BACKGROUND, 2), (BATCH, 3), (INTERACTIVE, 4), (0, 5)):
        put(queue, clock, level, value)
        clock.advance(0.001)
    assert observer.depths == {INTERACTIVE: 1, BACKGROUND: 2, BATCH: 2}
    taken = [values(await queue.next_batch()) for _ in range(5)]
    assert taken == [[4], [2], [5], [1], [3]]  # level 0 is the default level (2)
    assert observer.depths == {INTERACTIVE: 0, BACKGROUND: 0, BATCH: 0}


async def test_a_batch_is_the_most_urgent_requests_of_one_shape() -> None:
    clock = FakeClock()
    queue, _ = make_queue(clock, max_batch_size=2)
    for level, value in ((BATCH, 1), (BATCH, 2), (INTERACTIVE, 3), (BACKGROUND, 4)):
        put(queue, clock, level, value)
    assert values(await queue.next_batch()) == [3, 4]
    assert values(await queue.next_batch()) == [1, 2]


async def test_an_old_request_is_taken_as_the_highest_level_so_none_starves() -> None:
    clock = FakeClock()
    queue, _ = make_queue(clock, max_age_ms=500)
    put(queue, clock, BATCH, 1)
    clock.advance(0.499)
    put(queue, clock, INTERACTIVE, 2)
    assert values(await queue.next_batch()) == [2]  # not old enough yet
    put(queue, clock, INTERACTIVE, 3)
    clock.advance(0.001)  # the batch request has now waited 500 ms
    put(queue, clock, INTERACTIVE, 4)
    assert values(await queue.next_batch()) == [1]
    assert values(await queue.next_batch()) == [3]


async def test_a_level_over_its_own_queue_bound_is_shed_and_others_still_queue() -> None:
    clock = FakeClock()
    queue, observer = make_queue(clock, queue_policies={BATCH: {"max_queue_size": 1}})
    put(queue, clock, BATCH, 1)
    with pytest.raises(OverloadedError) as info:
        put(queue, clock, BATCH, 2)
    assert "1 requests of priority level 3 queued (that level's limit)" in info.value.message
    assert info.value.retry_after_ms == 50
    put(queue, clock, INTERACTIVE, 3)
    assert observer.shed_levels == Counter({BATCH: 1})
    assert len(queue) == 2


async def test_a_full_queue_sheds_its_least_urgent_newest_request_for_a_more_urgent_one() -> None:
    clock = FakeClock()
    queue, observer = make_queue(clock)  # at most 16 queued
    queued = [put(queue, clock, level, i) for i, level in enumerate([BATCH, BACKGROUND] * 8)]
    put(queue, clock, INTERACTIVE, 100)
    newest_batch = queued[-2]
    assert newest_batch.future.done() and not queued[0].future.done()
    with pytest.raises(OverloadedError, match="a more urgent request took this priority level 3"):
        newest_batch.future.result()
    assert observer.shed_levels == Counter({BATCH: 1})
    with pytest.raises(OverloadedError, match="16 requests queued"):
        put(queue, clock, BATCH, 101)  # nothing below the batch level to make room
    put(queue, clock, BACKGROUND, 102)  # takes the place of the next newest batch request
    assert observer.shed_levels == Counter({BATCH: 3})
    assert len(queue) == 16


async def test_a_level_s_queue_timeout_ends_only_its_own_waits() -> None:
    clock = FakeClock()
    queue, _ = make_queue(
        clock, max_age_ms=10_000, queue_policies={BATCH: {"default_timeout_ms": 100}}
    )
    slow = put(queue, clock, BATCH, 1)
    patient = put(queue, clock, BACKGROUND, 2)
    urgent = put(queue, clock, INTERACTIVE, 3)
    clock.advance(0.1)
    assert values(await queue.next_batch()) == [3]
    with pytest.raises(DeadlineExceededError, match="queue timeout of priority level 3"):
        await slow.future
    assert values(await queue.next_batch()) == [2]
    assert not patient.future.done() and not urgent.future.done()  # taken, not failed


# -- the generation scheduler (injected clock) --------------------------------------------


def sequence(level: int) -> EngineSequence:
    stats = SchedulerStats()
    handle = Generation(prompt_tokens=1, stats=stats, wake=lambda: None)
    return EngineSequence(
        prompt_ids=[1],
        params=SamplingParams(max_new_tokens=1),
        deadline=None,
        reserved_tokens=2,
        handle=handle,
        priority=level,
    )


def schedule(clock: FakeClock, max_waiting: int = 16) -> Schedule:
    limits = SchedulerLimits(
        max_running_sequences=1,
        max_tokens_in_flight=100,
        max_waiting=max_waiting,
        max_buffered_chunks=8,
        pushback_ms=50,
        priorities=Priorities(PrioritySettings(max_age_ms=500)),
    )
    return Schedule(name="tiny", limits=limits, stats=SchedulerStats(), clock=clock)


async def test_generations_join_by_level_and_an_old_one_joins_first() -> None:
    clock = FakeClock()
    plan = schedule(clock)
    batch, background, interactive = sequence(BATCH), sequence(0), sequence(INTERACTIVE)
    for waiting in (batch, background, interactive):
        plan.queue(waiting)
        clock.advance(0.1)
    assert plan.admit() == [interactive]
    plan.running.clear()
    clock.advance(0.4)  # the batch generation has now waited 600 ms: past the age bound
    assert plan.admit() == [batch]
    plan.running.clear()
    assert plan.admit() == [background]


async def test_a_full_waiting_queue_sheds_the_less_urgent_generation() -> None:
    clock = FakeClock()
    plan = schedule(clock, max_waiting=1)
    plan.queue(sequence(BACKGROUND))
    plan.running.extend(plan.admit())  # the one running sequence: the engine is full
    waiting_batch = sequence(BATCH)
    plan.queue(waiting_batch)
    urgent = sequence(INTERACTIVE)
    plan.queue(urgent)  # takes the batch generation's place
    assert list(plan.waiting) == [urgent]
    with pytest.raises(OverloadedError, match="took this priority level 3 generation's place"):
        await anext(waiting_batch.handle)
    with pytest.raises(OverloadedError, match="1 generations are already waiting"):
        plan.queue(sequence(BATCH))  # nothing below it waits


# -- admission ----------------------------------------------------------------------------


def test_admission_keeps_room_for_levels_above_the_lowest() -> None:
    metrics = Metrics()
    admission = AdmissionController(
        AdmissionSettings(max_inflight_requests=10, max_inflight_bytes=1 << 30), metrics
    )
    tickets = [admission.admit(priority=BATCH) for _ in range(9)]  # 90% of 10
    with pytest.raises(OverloadedError, match="the limit for priority level 3 is 9"):
        admission.admit(priority=BATCH)
    tickets.append(admission.admit(priority=INTERACTIVE))  # the last slot
    with pytest.raises(OverloadedError, match="the limit for priority level 1 is 10"):
        admission.admit(priority=INTERACTIVE)
    assert metrics.registry.get_sample_value("sluice_shed_total", {"level": "3"}) == 1
    assert metrics.registry.get_sample_value("sluice_shed_total", {"level": "1"}) == 1
    for ticket in tickets:
        ticket.release()


def test_without_priorities_the_whole_limit_is_there() -> None:
    admission = AdmissionController(
        AdmissionSettings(max_inflight_requests=10, max_inflight_bytes=1 << 30), Metrics()
    )
    tickets = [admission.admit() for _ in range(10)]  # the default level fills it all
    with pytest.raises(OverloadedError):
        admission.admit()
    for ticket in tickets:
        ticket.release()


# -- over a real server -------------------------------------------------------------------


def request(n_rows: int, value: float, priority: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(
        model_name="fake",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[n_rows, 4])
        ],
        raw_input_contents=[rows(value, n_rows).tobytes()],
    )
    if priority is not None:
        message.parameters["priority"].uint64_param = priority
    return message


def with_class(name: str) -> tuple[tuple[str, str]]:
    return (("x-sluice-priority", name),)


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
async def saturated(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> RunningServer:
    """Batches of at most 3 rows, one instance, at most 2 batch-class requests queued."""
    return await start_server(
        repository=fake_repository(
            tmp_path, "max_batch_size: 3\ndynamic_batching:\n  max_queue_delay_us: 0\n"
        ),
        backends=fake_backends(behaviour),
        clock=FakeClock(),
        admission={"max_inflight_requests": 10},
        priority={"queue_policies": {BATCH: {"max_queue_size": 2}}},
    )


def gauge(server: RunningServer, name: str, **labels: str) -> float | None:
    return server.metrics.registry.get_sample_value(name, labels)


async def test_under_a_saturated_queue_interactive_calls_run_first_and_batch_calls_are_shed(
    saturated: RunningServer, behaviour: Behaviour
) -> None:
    async with grpc.aio.insecure_channel(saturated.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = await occupy(stub, behaviour)
        batch = [
            asyncio.ensure_future(stub.ModelInfer(request(1, 10 + i), metadata=with_class("batch")))
            for i in range(2)
        ]
        await wait_queued(saturated, 2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(1, 99), metadata=with_class("batch"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "priority level 3" in (info.value.details() or "")
        assert dict(info.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "50"
        interactive = [
            asyncio.ensure_future(stub.ModelInfer(request(3, 20 + i, priority=INTERACTIVE)))
            for i in range(2)
        ]
        await wait_queued(saturated, 4)
        depth = {
            level: gauge(
                saturated, "sluice_priority_queue_depth", model="fake", version="1", level=level
            )
            for level in ("1", "3")
        }
        assert depth == {"1": 2.0, "3": 2.0}
        behaviour.release()
        await first
        for i, call in enumerate(interactive):
            answer = await call
            got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(-1, 4)
            np.testing.assert_array_equal(got, rows(2.0 * (20 + i), 3))
        for call in batch:
            await call
    # The two interactive calls (3 rows each) ran before the two batch calls (one batch).
    assert behaviour.batches == [1, 3, 3, 2]
    assert gauge(saturated, "sluice_shed_total", level="3") == 1
    assert gauge(saturated, "sluice_shed_total", level="1") is None


async def test_over_the_in_flight_limit_the_batch_class_is_shed_and_interactive_is_not(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    running = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(behaviour),
        clock=FakeClock(),
        admission={"max_inflight_requests": 10},
    )
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = await occupy(stub, behaviour)  # a background call (the default level)
        batch = [
            asyncio.ensure_future(stub.ModelInfer(request(1, i), metadata=with_class("batch")))
            for i in range(8)
        ]
        await wait_queued(running, 8)  # 9 in flight: the batch class's share of 10
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(1, 0), metadata=with_class("batch"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        urgent = asyncio.ensure_future(
            stub.ModelInfer(request(1, 7), metadata=with_class("interactive"))
        )
        await wait_queued(running, 9)
        behaviour.release()
        await asyncio.gather(first, urgent, *batch)
    assert gauge(running, "sluice_shed_total", level="3") == 1
    assert gauge(running, "sluice_rejected_requests_total", reason="overload") == 1


@pytest.mark.parametrize(
    ("metadata", "parameter", "expected"),
    [
        (with_class("urgent"), None, "one of the classes background=2, batch=3, interactive=1"),
        ((), 7, "parameter 'priority' is 7: priority levels run from 1 (highest) to 3"),
        (with_class("42"), None, "priority levels run from 1 (highest) to 3"),
    ],
)
async def test_bad_priorities_are_invalid_argument_over_the_wire(
    saturated: RunningServer,
    metadata: tuple[tuple[str, str], ...],
    parameter: int | None,
    expected: str,
) -> None:
    async with grpc.aio.insecure_channel(saturated.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(1, 1.0, priority=parameter), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (info.value.details() or "")


async def test_a_priority_parameter_of_the_wrong_type_is_invalid_argument(
    saturated: RunningServer,
) -> None:
    message = request(1, 1.0)
    message.parameters["priority"].string_param = "high"
    async with grpc.aio.insecure_channel(saturated.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-negative integer level" in (info.value.details() or "")


async def test_stream_requests_and_generations_take_the_metadata_level(
    server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        generation = gen_grpc.GenerationServiceStub(channel)
        request_ = gen.GenerateRequest(
            model_name="tiny_llama",
            prompt="Once upon a time",
            parameters=gen.SamplingParameters(max_new_tokens=2),
        )
        chunks = [c async for c in generation.Generate(request_, metadata=with_class("batch"))]
        assert chunks and chunks[-1].finish_reason
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in generation.Generate(request_, metadata=with_class("soon")):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "interactive=1" in (info.value.details() or "")


def test_the_readme_example_is_a_valid_settings_tree(tmp_path: Path) -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("### Urgency classes") :]
    start = section.index("```\n") + 4
    example = section[start : section.index("```", start)]
    config = tmp_path / "sluice.yaml"
    config.write_text(example)
    settings = load_settings(config)
    priorities = Priorities(settings.priority)
    assert priorities.resolve(metadata="batch") == BATCH
    assert priorities.queue_policy(BATCH).max_queue_size == 64
    assert priorities.admission_limit(BATCH, 100) == 90


async def test_each_request_of_a_stream_takes_its_own_level(server: RunningServer) -> None:
    def simple(request_id: str, priority: int) -> pb.ModelInferRequest:
        data = np.full((1, 16), 2, dtype=np.int32).tobytes()
        message = pb.ModelInferRequest(
            model_name="simple",
            id=request_id,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
                for n in ("INPUT0", "INPUT1")
            ],
            raw_input_contents=[data, data],
        )
        message.parameters["priority"].uint64_param = priority
        return message

    async def feed() -> Any:
        for request_id, level in (("a", 1), ("b", 0), ("c", 7), ("d", 3)):
            yield simple(request_id, level)

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(feed(), metadata=with_class("batch"))
        responses = [r async for r in call]
    by_id = {r.infer_response.id: r.error_message for r in responses}
    assert by_id["a"] == by_id["b"] == by_id["d"] == ""
    assert "parameter 'priority' is 7: priority levels run from 1 (highest) to 3" in by_id["c"]
