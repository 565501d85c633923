"""sluice.v1.GenerationService over a real server on the bundled model: streamed text,
sessions, cancellation, deadlines, context overflow, fallback before the first token."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import torch

from sluice.app import EXAMPLE_REPOSITORY
from sluice.generation.causal_lm import CausalLM
from sluice.generation.generate import generate
from sluice.generation.sampling import SamplingParams
from sluice.generation.scheduler import ContinuousBatcher, SchedulerStats
from sluice.generation.tokenizer import Tokenizer
from sluice.prober import HealthProber
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import RunningServer, StartServer

TINY = EXAMPLE_REPOSITORY / "tiny_llama" / "1"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference() -> Callable[[str, int], str]:
    lm, tokenizer = CausalLM.load(TINY), Tokenizer.load(TINY)

    def text(prompt: str, max_new_tokens: int) -> str:
        params = SamplingParams(max_new_tokens=max_new_tokens)
        chunks = generate(lm, tokenizer, tokenizer.encode(prompt), params)
        return "".join(chunk.text for chunk in chunks)

    return text


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


def request(prompt: str = PROMPT, model: str = "tiny_llama", **params: int) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model_name=model, prompt=prompt, parameters=gen.SamplingParameters(**params)
    )


async def collect(call: grpc.aio.UnaryStreamCall) -> list[gen.GenerateResponse]:  # type: ignore[type-arg]
    return [response async for response in call]


def stats(server: RunningServer, model: str = "tiny_llama") -> SchedulerStats:
    engine = server.service.get(model, healthy=False).engine
    assert engine is not None
    return engine.stats


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def repository_with(tmp_path: Path, **models: dict[str, object]) -> Path:
    """The example models plus copies of the tiny model: name -> {"config": config.yaml
    text, "context": max_position_embeddings}."""
    repository = tmp_path / "models"
    shutil.copytree(EXAMPLE_REPOSITORY, repository)
    for name, options in models.items():
        folder = repository / name / "1"
        shutil.copytree(TINY, folder)
        if "context" in options:
            config = json.loads((folder / "config.json").read_text())
            config["max_position_embeddings"] = options["context"]
            (folder / "config.json").write_text(json.dumps(config))
        if "config" in options:
            (repository / name / "config.yaml").write_text(str(options["config"]))
    return repository


async def test_streamed_chunks_add_up_to_the_unary_result_and_the_reference(
    server: RunningServer, channel: grpc.aio.Channel, reference: Callable[[str, int], str]
) -> None:
    chunks = await collect(
        gen_grpc.GenerationServiceStub(channel).Generate(request(max_new_tokens=30))
    )
    streamed = "".join(chunk.text for chunk in chunks)
    assert streamed == reference(PROMPT, 30)
    assert all(c.finish_reason == gen.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 30)
    assert sum(len(c.token_ids) for c in chunks) == 30
    assert {(c.model_name, c.model_version, c.fallback_reason) for c in chunks} == {
        ("tiny_llama", "1", "")
    }
    # The same model through ModelInfer: the whole text at once.
    infer = pb.ModelInferRequest(model_name="tiny_llama")
    text_input = infer.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text_input.contents.bytes_contents.append(PROMPT.encode())
    max_tokens = infer.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    max_tokens.contents.int_contents.append(30)
    response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer)
    raw = response.raw_output_contents[0]
    assert response.outputs[0].name == "text_output"
    assert raw[4:].decode() == streamed


async def test_concurrent_generations_each_equal_their_solo_run(
    server: RunningServer, channel: grpc.aio.Channel, reference: Callable[[str, int], str]
) -> None:
    stub = gen_grpc.GenerationServiceStub(channel)
    cases = [(PROMPT, 40), ("The little dog", 10), ("Tom", 25), ("The sun was warm and", 33)]
    results = await asyncio.gather(
        *(collect(stub.Generate(request(prompt, max_new_tokens=n))) for prompt, n in cases)
    )
    for (prompt, n), chunks in zip(cases, results, strict=True):
        assert "".join(c.text for c in chunks) == reference(prompt, n)
    assert stats(server).decode_steps < sum(c[-1].usage.completion_tokens for c in results)


async def test_a_client_that_goes_away_stops_its_decode_within_one_step(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    call = gen_grpc.GenerationServiceStub(channel).Generate(request(max_new_tokens=170))
    for _ in range(3):
        await call.read()
    call.cancel()
    counters = stats(server)
    await until(lambda: counters.cancelled == 1)
    await until(lambda: counters.running == 0)
    assert counters.max_steps_after_cancel <= 1
    assert counters.tokens_generated < 170
    assert server.service.get("tiny_llama", healthy=False).engine.lm.live_sequences == 0  # type: ignore[union-attr]


async def test_a_session_interleaves_generations_and_cancels_one(
    server: RunningServer, channel: grpc.aio.Channel, reference: Callable[[str, int], str]
) -> None:
    outgoing: asyncio.Queue[gen.GenerateStreamRequest | None] = asyncio.Queue()

    async def messages() -> AsyncIterator[gen.GenerateStreamRequest]:
        while (message := await outgoing.get()) is not None:
            yield message

    def start(request_id: str, prompt: str, n: int) -> gen.GenerateStreamRequest:
        return gen.GenerateStreamRequest(
            start=gen.StartGeneration(
                request_id=request_id, request=request(prompt, max_new_tokens=n)
            )
        )

    call = gen_grpc.GenerationServiceStub(channel).GenerateStream(messages())
    for message in (start("a", PROMPT, 40), start("b", "Tom", 30), start("long", PROMPT, 170)):
        outgoing.put_nowait(message)
    got: dict[str, list[gen.GenerateResponse]] = {"a": [], "b": [], "long": []}
    order: list[str] = []
    cancelled = False
    async for response in call:
        got[response.request_id].append(response.chunk)
        order.append(response.request_id)
        if not cancelled and len(got["long"]) == 3:
            outgoing.put_nowait(
                gen.GenerateStreamRequest(cancel=gen.CancelGeneration(request_id="long"))
            )
            cancelled = True
        if all(chunks and chunks[-1].finish_reason for chunks in got.values()):
            outgoing.put_nowait(None)
    assert "".join(c.text for c in got["a"]) == reference(PROMPT, 40)
    assert "".join(c.text for c in got["b"]) == reference("Tom", 30)
    last = got["long"][-1]
    assert last.finish_reason == gen.FINISH_REASON_CANCELLED
    assert 3 <= last.usage.completion_tokens < 170
    # Interleaved, not one generation after another.
    first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert first_b < last_a


async def test_a_session_reports_a_failed_generation_and_goes_on(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    messages = [
        gen.GenerateStreamRequest(
            start=gen.StartGeneration(request_id="bad", request=request(model="nope"))
        ),
        gen.GenerateStreamRequest(
            start=gen.StartGeneration(request_id="ok", request=request(max_new_tokens=5))
        ),
    ]
    responses = [
        r async for r in gen_grpc.GenerationServiceStub(channel).GenerateStream(iter(messages))
    ]
    bad = [r for r in responses if r.request_id == "bad"]
    assert len(bad) == 1 and bad[0].chunk.finish_reason == gen.FINISH_REASON_ERROR
    assert bad[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "unknown model 'nope'" in bad[0].error.message
    ok = [r for r in responses if r.request_id == "ok"]
    assert ok[-1].chunk.finish_reason == gen.FINISH_REASON_LENGTH


async def test_a_deadline_mid_stream_ends_with_deadline_exceeded_after_partial_tokens(
    start_server: StartServer, tmp_path: Path
) -> None:
    slow = "faults:\n  mode: slow\n  delay_ms: 20\n"
    server = await start_server(repository=repository_with(tmp_path, slow_llama={"config": slow}))
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = gen_grpc.GenerationServiceStub(channel).Generate(
            request(model="slow_llama", max_new_tokens=170), timeout=1.0
        )
        chunks = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for chunk in call:
                chunks.append(chunk)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= len(chunks) < 170
    counters = stats(server, "slow_llama")
    await until(lambda: counters.running == 0)


async def test_a_prompt_beyond_the_context_fails_naming_both_numbers(
    channel: grpc.aio.Channel,
) -> None:
    stub = gen_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(stub.Generate(request(max_new_tokens=253)))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the prompt has 4 tokens and max_new_tokens is 253" in str(failed.value.details())
    assert "context of 256" in str(failed.value.details())
    count = await stub.CountTokens(gen.CountTokensRequest(model_name="tiny_llama", prompt=PROMPT))
    assert (count.token_count, count.max_context) == (4, 256)


async def test_a_prompt_beyond_the_context_escalates_to_a_larger_context_fallback(
    start_server: StartServer, tmp_path: Path, reference: Callable[[str, int], str]
) -> None:
    short = {"context": 32, "config": "fallbacks:\n  - model: tiny_llama\n"}
    server = await start_server(repository=repository_with(tmp_path, short_llama=short))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        fits = await collect(stub.Generate(request(model="short_llama", max_new_tokens=20)))
        escalated = await collect(stub.Generate(request(model="short_llama", max_new_tokens=40)))
    assert {c.model_name for c in fits} == {"short_llama"} and not fits[0].fallback_reason
    assert {c.model_name for c in escalated} == {"tiny_llama"}
    reason = escalated[0].fallback_reason
    assert "need a larger context than model 'short_llama' has (32)" in reason
    assert "".join(c.text for c in escalated) == reference(PROMPT, 40)


async def test_a_primary_failing_before_its_first_token_hands_over_transparently(
    start_server: StartServer, tmp_path: Path, reference: Callable[[str, int], str]
) -> None:
    failing = {"config": "faults:\n  mode: fail\nfallbacks:\n  - model: tiny_llama\n"}
    server = await start_server(repository=repository_with(tmp_path, failing_llama=failing))
    async with grpc.aio.insecure_channel(server.address) as channel:
        chunks = await collect(
            gen_grpc.GenerationServiceStub(channel).Generate(
                request(model="failing_llama", max_new_tokens=12)
            )
        )
    assert {c.model_name for c in chunks} == {"tiny_llama"}
    assert "failing_llama' failed before its first token" in chunks[0].fallback_reason
    assert "".join(c.text for c in chunks) == reference(PROMPT, 12)


async def test_a_primary_hanging_before_its_first_token_hands_over_within_the_deadline(
    start_server: StartServer, tmp_path: Path, reference: Callable[[str, int], str]
) -> None:
    hanging = {"config": "faults:\n  mode: hang\nfallbacks:\n  - model: tiny_llama\n"}
    server = await start_server(repository=repository_with(tmp_path, hanging_llama=hanging))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        for number in range(8):
            call = stub.Generate(request(model="hanging_llama", max_new_tokens=8), timeout=1.0)
            chunks = await collect(call)  # a DEADLINE_EXCEEDED would fail the test
            assert {c.model_name for c in chunks} == {"tiny_llama"}
            assert "".join(c.text for c in chunks) == reference(PROMPT, 8)
            assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
            why = chunks[0].fallback_reason
            if number < 5:  # each waited its share of the deadline, then was abandoned
                assert "made no first token within this attempt's 0." in why, why
            else:  # five failures opened its breaker: passed over at once
                assert "circuit breaker is open" in why, why
    breaker = {"model": "hanging_llama", "version": "1", "backend": "causal_lm"}
    assert server.metrics.registry.get_sample_value("sluice_breaker_state", breaker) == 2
    hung = stats(server, "hanging_llama")
    await until(lambda: hung.running == 0)  # its engine dropped every abandoned sequence
    assert hung.cancelled == 5 and hung.prefills == 0


async def test_a_failure_after_the_first_token_ends_the_stream_with_unavailable(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = "faults:\n  mode: fail\n  after_tokens: 3\nfallbacks:\n  - model: tiny_llama\n"
    server = await start_server(repository=repository_with(tmp_path, late_llama={"config": config}))
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = gen_grpc.GenerationServiceStub(channel).Generate(
            request(model="late_llama", max_new_tokens=20)
        )
        chunks = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for chunk in call:
                chunks.append(chunk)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected fault" in str(ended.value.details())
    assert len(chunks) == 3 and {c.model_name for c in chunks} == {"late_llama"}


@pytest.mark.parametrize(
    ("model", "params", "code", "text"),
    [
        ("simple", {}, grpc.StatusCode.UNIMPLEMENTED, "does not generate text"),
        ("tiny_llama", {"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p must be"),
        ("nope", {}, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ],
)
async def test_bad_generation_requests_get_a_clear_status(
    channel: grpc.aio.Channel,
    model: str,
    params: dict[str, float],
    code: grpc.StatusCode,
    text: str,
) -> None:
    call = gen_grpc.GenerationServiceStub(channel).Generate(
        gen.GenerateRequest(
            model_name=model, prompt=PROMPT, parameters=gen.SamplingParameters(**params)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(call)
    assert failed.value.code() == code
    assert text in str(failed.value.details())


def stream_request(
    request_id: str, *, stream: bool, empty_final: bool = False
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="tiny_llama", id=request_id)
    text_input = message.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text_input.contents.bytes_contents.append(PROMPT.encode())
    max_tokens = message.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    max_tokens.contents.int_contents.append(8)
    flag = message.inputs.add(name="stream", datatype="BOOL", shape=[1])
    flag.contents.bool_contents.append(stream)
    if empty_final:
        message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


def text_of(response: pb.ModelStreamInferResponse) -> str:
    raw = response.infer_response.raw_output_contents
    return raw[0][4:].decode() if raw else ""


def final(response: pb.ModelStreamInferResponse) -> bool:
    return response.infer_response.parameters["triton_final_response"].bool_param


async def test_model_stream_infer_serves_generation_models_decoupled(
    channel: grpc.aio.Channel, reference: Callable[[str, int], str]
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    config = await stub.ModelConfig(pb.ModelConfigRequest(name="tiny_llama"))
    assert config.config.model_transaction_policy.decoupled
    assert {i.name: i.optional for i in config.config.input}["max_tokens"]
    requests = [
        stream_request("s", stream=True),
        stream_request("whole", stream=False),
        stream_request("e", stream=True, empty_final=True),
    ]
    responses = [r async for r in stub.ModelStreamInfer(iter(requests))]
    assert not any(r.error_message for r in responses)
    by_id: dict[str, list[pb.ModelStreamInferResponse]] = {}
    for response in responses:
        by_id.setdefault(response.infer_response.id, []).append(response)
    expected = reference(PROMPT, 8)
    streamed = by_id["s"]
    assert len(streamed) == 8 and "".join(map(text_of, streamed)) == expected
    assert [final(r) for r in streamed] == [False] * 7 + [True]
    assert [(text_of(r), final(r)) for r in by_id["whole"]] == [(expected, True)]
    empty = by_id["e"]
    assert len(empty) == 9 and [final(r) for r in empty] == [False] * 8 + [True]
    assert not empty[-1].infer_response.outputs


async def test_probes_and_statistics_cover_generation_models(server: RunningServer) -> None:
    await HealthProber(server.service, server.settings.probe, clock=time.monotonic).probe_all()
    assert server.service.is_ready("tiny_llama")
    before = server.service.get("tiny_llama", healthy=False).stats.inference_count
    async with grpc.aio.insecure_channel(server.address) as channel:
        await collect(gen_grpc.GenerationServiceStub(channel).Generate(request(max_new_tokens=3)))
    assert server.service.get("tiny_llama", healthy=False).stats.inference_count == before + 1
    # The whole text through ModelInfer counts too.
    infer = pb.ModelInferRequest(model_name="tiny_llama")
    text_input = infer.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text_input.contents.bytes_contents.append(PROMPT.encode())
    async with grpc.aio.insecure_channel(server.address) as channel:
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer)
    stats = server.service.get("tiny_llama", healthy=False).stats
    assert stats.inference_count == before + 2
    assert stats.execution_count >= 2 and stats.success.count >= 2


async def test_a_drain_lets_streams_finish_their_generations_then_ends_sessions(
    start_server: StartServer, reference: Callable[[str, int], str]
) -> None:
    server = await start_server()
    outgoing: asyncio.Queue[gen.GenerateStreamRequest | None] = asyncio.Queue()

    async def messages() -> AsyncIterator[gen.GenerateStreamRequest]:
        while (message := await outgoing.get()) is not None:
            yield message

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        unary = stub.Generate(request(max_new_tokens=60))
        session = stub.GenerateStream(messages())
        outgoing.put_nowait(
            gen.GenerateStreamRequest(
                start=gen.StartGeneration(request_id="a", request=request(max_new_tokens=60))
            )
        )
        first = await session.read()
        await unary.read()
        drain = asyncio.create_task(server.server.drain(30))
        session_chunks = [first.chunk]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (response := await session.read()) is not grpc.aio.EOF:
                session_chunks.append(response.chunk)
        rest = []
        while (chunk := await unary.read()) is not grpc.aio.EOF:
            rest.append(chunk)
        await drain
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in str(ended.value.details())
    assert session_chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert "".join(c.text for c in session_chunks) == reference(PROMPT, 60)
    assert rest[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert len(rest) == 59


async def test_a_decoupled_stream_that_ends_early_stops_every_generation_it_started(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    long_requests = []
    for request_id in ("first", "second", "third"):
        message = stream_request(request_id, stream=True)
        message.inputs[1].contents.int_contents[0] = 170  # max_tokens
        long_requests.append(message)
    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(long_requests))
    first = await call.read()
    assert first.infer_response.id == "first"
    call.cancel()
    model = server.service.get("tiny_llama", healthy=False)
    counters = stats(server)
    await until(lambda: counters.running == 0 and counters.waiting == 0)
    await until(lambda: model.inflight == 0)
    assert counters.cancelled == 3
    assert counters.tokens_generated < 3 * 170


async def test_decoupled_responses_interleave_across_requests_on_one_stream(
    channel: grpc.aio.Channel,
) -> None:
    long = stream_request("long", stream=True)
    long.inputs[1].contents.int_contents[0] = 150  # max_tokens
    short = stream_request("short", stream=True)
    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([long, short]))
    finished: list[str] = []
    counts: Counter[str] = Counter()
    async for response in call:
        counts[response.infer_response.id] += 1
        if final(response):
            finished.append(response.infer_response.id)
    # The short generation, sent second, ends while the long one, sent first, still runs.
    assert finished == ["short", "long"]
    assert counts["short"] == 8 and counts["long"] > 8


async def test_a_prompt_longer_than_the_context_could_hold_is_refused_untokenized(
    server: RunningServer,
) -> None:
    """tiny_llama's 256-token context holds at most 3328 bytes of text: a 5 kB prompt is
    refused by the model before it is tokenized; a 34 kB one (longer than any model here
    takes, with all the room the other fields may need) before it is even decoded."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        for prompt, said in (
            ("Once upon a time " * 300, ("5100 bytes", "can hold at most 3328 bytes")),
            ("Once upon a time " * 2000, ("more than the 19712", "than the 3328 bytes")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as generate:
                async for _ in stub.Generate(
                    gen.GenerateRequest(model_name="tiny_llama", prompt=prompt)
                ):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as count:
                await stub.CountTokens(
                    gen.CountTokensRequest(model_name="tiny_llama", prompt=prompt)
                )
            for info in (generate, count):
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = str(info.value.details())
                assert all(part in details for part in said), details


async def test_a_stream_message_longer_than_any_prompt_ends_the_stream_undecoded(
    channel: grpc.aio.Channel,
) -> None:
    """On GenerateStream each message is bounded as it arrives: the generation already
    running gets its end, then the stream ends with INVALID_ARGUMENT naming the message."""
    messages = [
        gen.GenerateStreamRequest(
            start=gen.StartGeneration(request_id="ok", request=request(max_new_tokens=3))
        ),
        gen.GenerateStreamRequest(
            start=gen.StartGeneration(
                request_id="huge",
                request=gen.GenerateRequest(model_name="tiny_llama", prompt="x" * 40_000),
            )
        ),
    ]
    call = gen_grpc.GenerationServiceStub(channel).GenerateStream(iter(messages))
    responses = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for response in call:
            responses.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2 of the GenerateStream stream has" in str(info.value.details())
    assert "than the 3328 bytes" in str(info.value.details())
    assert not [r for r in responses if r.request_id == "huge"]
    ended = [r for r in responses if r.request_id == "ok" and r.chunk.finish_reason]
    assert len(ended) == 1, responses


async def test_generation_dtype_bfloat16_serves_what_the_bfloat16_model_generates_alone(
    start_server: StartServer,
) -> None:
    # ``generation.dtype: bfloat16`` reaches the model (weights and key/value cache), and a
    # stream over the wire carries exactly what the model in that type generates alone
    # (its decode steps take the half-type attention path).
    server = await start_server(generation={"dtype": "bfloat16"})
    engine = server.service.get("tiny_llama", healthy=False).engine
    assert isinstance(engine, ContinuousBatcher)
    assert {p.dtype for p in engine.lm._module.parameters()} == {torch.bfloat16}
    lm, tokenizer = CausalLM.load(TINY, dtype=torch.bfloat16), Tokenizer.load(TINY)
    alone = generate(lm, tokenizer, tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=40))
    expected = [chunk.token_id for chunk in alone]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        chunks = await collect(stub.Generate(request(max_new_tokens=40)))
    assert [token for chunk in chunks for token in chunk.token_ids] == expected
    assert len(expected) == 40


@pytest.mark.parametrize(
    "server_dtype, model_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")]
)
async def test_a_models_own_generation_dtype_overrides_the_servers(
    start_server: StartServer, tmp_path: Path, server_dtype: str, model_dtype: str
) -> None:
    # ``generation: {dtype: ...}`` in one model's config.yaml: that model runs in its own
    # type (and streams what the model in that type generates alone), the server's other
    # generation model in the server's; on a tensor model the field is a load error
    # naming it.
    repository = repository_with(
        tmp_path,
        own_llama={"config": f"generation:\n  dtype: {model_dtype}\n"},
        short_llama={"config": "generation:\n  dtype: bf16\n"},
        misspelt_llama={"config": "generation:\n  dtyp: bfloat16\n"},
    )
    (repository / "simple" / "config.yaml").write_text(f"generation: {{dtype: {model_dtype}}}\n")
    server = await start_server(repository=repository, generation={"dtype": server_dtype})
    types = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def weights(model: str) -> set[torch.dtype]:
        engine = server.service.get(model, healthy=False).engine
        assert isinstance(engine, ContinuousBatcher)
        return {p.dtype for p in engine.lm._module.parameters()}

    assert weights("own_llama") == {types[model_dtype]}
    assert weights("tiny_llama") == {types[server_dtype]}
    lm, tokenizer = CausalLM.load(TINY, dtype=types[model_dtype]), Tokenizer.load(TINY)
    alone = generate(lm, tokenizer, tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=24))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        chunks = await collect(stub.Generate(request(model="own_llama", max_new_tokens=24)))
    assert [token for chunk in chunks for token in chunk.token_ids] == [
        chunk.token_id for chunk in alone
    ]
    reasons = [row.reason for row in server.service.index() if row.name == "simple"]
    says = "field 'generation.dtype': this is not a generation model"
    assert any(says in reason for reason in reasons), reasons
    assert not server.service.is_ready("simple")
    # A value or a key the setting does not have: the model is not served (rather than run
    # in the server's type), and its reason names the file, the field and what it takes.
    for model, says in [
        ("short_llama", "field 'generation.dtype': Input should be 'float32', 'bfloat16' or"),
        ("misspelt_llama", "field 'generation.dtyp': Extra inputs are not permitted"),
    ]:
        reasons = [row.reason for row in server.service.index() if row.name == model]
        assert any(f"{model}/config.yaml: {says}" in reason for reason in reasons), reasons
        assert not server.service.is_ready(model)
