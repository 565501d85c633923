"""The response cache: its byte-bounded LRU and its key, then over a real server on the
example ``simple`` ONNX model (real ONNX Runtime): repeated calls answered without running,
visible in the metrics and in ModelStatistics, and its memory bound held."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio

from sluice.caching import ByteLRU, Cached, codec
from sluice.caching.keys import request_key, version_identity
from sluice.caching.lru import ENTRY_OVERHEAD_BYTES, entry_bytes
from sluice.domain import InferRequest, InputTensor, OutputTensor
from sluice.repository import ModelSpec
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, StartServer
from tests.redis_server import free_port, running_redis

CACHED = "response_cache: {enabled: true}\n"

# -- the store ----------------------------------------------------------------------------


def entry(model: str, nbytes: int) -> Cached:
    array = np.zeros(nbytes, dtype=np.uint8)
    outputs = (OutputTensor("OUT", "UINT8", array),)
    return Cached(model, "1", "onnxruntime", outputs, entry_bytes(outputs))


def test_lru_stays_within_its_byte_budget_and_counts_what_it_evicts() -> None:
    evicted: list[Cached] = []
    lru = ByteLRU(max_bytes=10_000, max_entry_bytes=5_000, on_evict=evicted.append)
    size = entry("m", 1000).nbytes
    assert size == 1000 + ENTRY_OVERHEAD_BYTES
    for index in range(50):
        assert lru.put(index.to_bytes(32, "little"), entry("m", 1000))
        assert lru.size_bytes <= 10_000
    assert len(lru) == 10_000 // size
    assert len(evicted) == 50 - len(lru)
    assert lru.size_bytes == len(lru) * size
    # The oldest went first: the newest are all there.
    assert all(lru.get(i.to_bytes(32, "little")) is not None for i in range(50 - len(lru), 50))
    assert lru.get((0).to_bytes(32, "little")) is None


def test_lru_shared_by_threads_keeps_its_books() -> None:
    size = entry("m", 100).nbytes
    evicted: list[Cached] = []
    lru = ByteLRU(max_bytes=20 * size, max_entry_bytes=size, on_evict=evicted.append)

    def work(offset: int) -> None:
        for index in range(500):
            key = (offset * 1000 + index % 50).to_bytes(32, "little")
            lru.put(key, entry("m", 100))
            lru.get((offset * 1000 + index % 7).to_bytes(32, "little"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lru.size_bytes == len(lru) * size <= 20 * size
    assert len(lru) == 20
    distinct_puts = 4 * 50
    assert len(evicted) >= distinct_puts - 20


def test_lru_drops_the_least_recently_used_not_the_oldest() -> None:
    lru = ByteLRU(max_bytes=3 * entry("m", 100).nbytes, max_entry_bytes=10_000)
    for key in (b"a", b"b", b"c"):
        lru.put(key, entry("m", 100))
    assert lru.get(b"a") is not None  # now the most recently used
    lru.put(b"d", entry("m", 100))
    assert lru.get(b"b") is None
    assert [lru.get(key) is not None for key in (b"a", b"c", b"d")] == [True, True, True]


def test_lru_refuses_entries_larger_than_the_entry_limit_or_the_budget() -> None:
    lru = ByteLRU(max_bytes=4000, max_entry_bytes=100_000)
    assert not lru.put(b"big", entry("m", 5000))  # larger than the whole budget
    small = ByteLRU(max_bytes=100_000, max_entry_bytes=2000)
    assert not small.put(b"big", entry("m", 2000))
    assert small.put(b"ok", entry("m", 1000))
    assert len(lru) == 0 and lru.size_bytes == 0 and len(small) == 1


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    lru = ByteLRU(max_bytes=100_000, max_entry_bytes=100_000)
    lru.put(b"k", entry("m", 1000))
    lru.put(b"k", entry("m", 3000))
    assert len(lru) == 1 and lru.size_bytes == entry("m", 3000).nbytes


def test_bytes_elements_are_weighed_by_their_contents_and_count() -> None:
    strings = np.array([b"x" * 1000, b"y" * 10], dtype=object)
    cost = entry_bytes([OutputTensor("OUT", "BYTES", strings)])
    assert cost > 1010 + ENTRY_OVERHEAD_BYTES


# -- the key ------------------------------------------------------------------------------


def spec(name: str = "simple", version: str = "1", path: Path = Path("/nowhere")) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        backend="onnxruntime",
        path=path,
        io=None,  # type: ignore[arg-type]  # the key never reads it
        batching=None,  # type: ignore[arg-type]
        instance_count=1,
        auto_configured=True,
    )


def key_of(
    *inputs: InputTensor,
    model: ModelSpec | None = None,
    wanted: tuple[str, ...] = ("OUT",),
    parameters: dict[str, object] | None = None,
) -> bytes:
    model = model or spec()
    request = InferRequest(model=model.name, inputs=list(inputs), parameters=parameters or {})
    identity = version_identity(model)
    return request_key(request, spec=model, identity=identity, wanted=wanted).digest


def raw(name: str, values: list[int], datatype: str = "INT32") -> InputTensor:
    array = np.array(values, dtype="<i4" if datatype == "INT32" else "<i8")
    return InputTensor(name, datatype, (1, len(values)), raw=array.tobytes())


def test_the_key_covers_everything_that_decides_the_answer() -> None:
    base = key_of(raw("A", [1, 2]), raw("B", [3, 4]))
    assert len(base) == 32
    assert key_of(raw("A", [1, 2]), raw("B", [3, 4])) == base
    assert key_of(raw("B", [3, 4]), raw("A", [1, 2])) == base  # input order does not matter
    different = [
        key_of(raw("A", [1, 2]), raw("B", [3, 5])),  # contents
        key_of(raw("A", [1, 2]), raw("C", [3, 4])),  # name
        key_of(raw("A", [1, 2]), raw("B", [3, 4], "INT64")),  # datatype
        key_of(
            raw("A", [1, 2]),
            InputTensor("B", "INT32", (2, 1), raw=np.array([3, 4], "<i4").tobytes()),  # shape
        ),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), model=spec(version="2")),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), model=spec(name="other")),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), wanted=("OUT", "OTHER")),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), parameters={"mode": "fast"}),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), parameters={"mode": 1}),
        key_of(raw("A", [1, 2]), raw("B", [3, 4]), parameters={"mode": "1"}),
    ]
    assert len({base, *different}) == len(different) + 1


def test_parameters_that_only_bound_the_call_do_not_split_the_cache() -> None:
    base = key_of(raw("A", [1, 2]))
    assert key_of(raw("A", [1, 2]), parameters={"timeout": 5000, "priority": 1}) == base


def test_field_boundaries_cannot_be_shifted_to_forge_a_key() -> None:
    """Names and contents are length-framed: moving bytes from one field into its
    neighbour never gives the same stream."""
    first = key_of(InputTensor("AB", "BYTES", (1,), raw=b"\x01\x00\x00\x00C"))
    second = key_of(InputTensor("A", "BYTES", (1,), raw=b"B\x01\x00\x00\x00C"))
    assert first != second


def test_typed_and_raw_contents_of_the_same_tensor_share_a_key() -> None:
    typed = InputTensor("A", "INT32", (1, 3), values=[1, -2, 3])
    assert key_of(typed) == key_of(raw("A", [1, -2, 3]))
    strings = InputTensor("S", "BYTES", (2,), values=[b"ab", b""])
    wire = b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert key_of(strings) == key_of(InputTensor("S", "BYTES", (2,), raw=wire))


def test_changed_model_files_change_the_key(tmp_path: Path) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"one")
    before = key_of(raw("A", [1]), model=spec(path=model_file))
    model_file.write_bytes(b"other file")
    assert key_of(raw("A", [1]), model=spec(path=model_file)) != before


# -- over a real server -------------------------------------------------------------------

ONES = np.ones((1, 16), dtype=np.int32)


def request(
    model: str = "simple", first: np.ndarray = ONES, **fields: object
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
            for n in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[first.astype("<i4").tobytes(), ONES.tobytes()],
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
async def channel() -> AsyncIterator[list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    yield channels
    for opened in channels:
        await opened.close()


def stub(
    server: RunningServer, channels: list[grpc.aio.Channel]
) -> pb_grpc.GRPCInferenceServiceStub:
    opened = grpc.aio.insecure_channel(server.address)
    channels.append(opened)
    return pb_grpc.GRPCInferenceServiceStub(opened)


async def infer(
    client: pb_grpc.GRPCInferenceServiceStub, message: pb.ModelInferRequest
) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    call = client.ModelInfer(message)
    response = await call
    return response, dict(await call.trailing_metadata() or ())


def sample(server: RunningServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def statistics(
    client: pb_grpc.GRPCInferenceServiceStub, model: str = "simple"
) -> pb.ModelStatistics:
    reply = await client.ModelStatistics(pb.ModelStatisticsRequest(name=model, version="1"))
    return reply.model_stats[0]


def cached_repository(repository: Path, config: str = CACHED) -> Path:
    (repository / "simple" / "config.yaml").write_text(config)
    return repository


async def test_a_repeated_call_is_answered_from_the_cache_without_running(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    server = await start_server(repository=cached_repository(example_repository))
    client = stub(server, channel)
    first, first_trailers = await infer(client, request(id="one"))
    second, trailers = await infer(client, request(id="two"))
    assert "sluice-cache" not in first_trailers
    assert not first.parameters["sluice_cache_hit"].bool_param
    assert trailers["sluice-cache"] == "hit"
    assert trailers["x-sluice-served-by"] == "simple/1/onnxruntime"
    assert second.parameters["sluice_cache_hit"].bool_param
    assert second.id == "two"  # the caller's id, not the cached call's
    assert second.raw_output_contents == first.raw_output_contents
    assert [o.name for o in second.outputs] == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(
        np.frombuffer(second.raw_output_contents[0], "<i4"), (ONES + ONES).ravel()
    )
    config = await client.ModelConfig(pb.ModelConfigRequest(name="simple"))
    assert config.config.response_cache.enable
    stats = await statistics(client)
    assert stats.execution_count == 1  # the executor ran once
    assert stats.inference_stats.cache_hit.count == 1
    assert stats.inference_stats.cache_miss.count == 1
    assert stats.inference_stats.success.count == 2
    assert sample(server, "sluice_cache_hits_total", model="simple") == 1
    assert sample(server, "sluice_cache_misses_total", model="simple") == 1
    assert sample(server, "sluice_batch_size_count", model="simple", version="1") == 1
    assert sample(server, "sluice_cache_entries") == 1
    assert 0 < sample(server, "sluice_cache_bytes") <= server.settings.cache.max_bytes


async def test_typed_contents_of_the_same_tensor_hit_the_raw_calls_entry(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    server = await start_server(repository=cached_repository(example_repository))
    client = stub(server, channel)
    await infer(client, request())
    typed = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=n,
                datatype="INT32",
                shape=[1, 16],
                contents=pb.InferTensorContents(int_contents=[1] * 16),
            )
            for n in ("INPUT0", "INPUT1")
        ],
    )
    _, trailers = await infer(client, typed)
    assert trailers["sluice-cache"] == "hit"
    assert (await statistics(client)).execution_count == 1


async def test_a_different_input_or_output_list_is_a_miss(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    server = await start_server(repository=cached_repository(example_repository))
    client = stub(server, channel)
    await infer(client, request())
    other, trailers = await infer(client, request(first=ONES * 5))
    assert "sluice-cache" not in trailers
    np.testing.assert_array_equal(
        np.frombuffer(other.raw_output_contents[0], "<i4"), (ONES * 6).ravel()
    )
    only_diff = request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="OUTPUT1")])
    answer, trailers = await infer(client, only_diff)
    assert "sluice-cache" not in trailers and [o.name for o in answer.outputs] == ["OUTPUT1"]
    _, trailers = await infer(client, only_diff)
    assert trailers["sluice-cache"] == "hit"
    stats = await statistics(client)
    assert stats.execution_count == 3
    assert (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count) == (1, 3)


async def test_another_model_never_reads_an_entry(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    shutil.copytree(example_repository / "simple", example_repository / "twin")
    (example_repository / "twin" / "config.yaml").write_text(CACHED)
    server = await start_server(repository=cached_repository(example_repository))
    client = stub(server, channel)
    await infer(client, request("simple"))
    _, trailers = await infer(client, request("twin"))
    assert "sluice-cache" not in trailers
    assert sample(server, "sluice_cache_misses_total", model="twin") == 1
    assert (await statistics(client, "twin")).execution_count == 1


async def test_failures_are_not_cached(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    repository = cached_repository(example_repository, CACHED + "faults: {mode: fail}\n")
    server = await start_server(repository=repository, breaker={"fail_max": 100})
    client = stub(server, channel)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await infer(client, request())
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sample(server, "sluice_cache_hits_total", model="simple") == 0
    assert sample(server, "sluice_cache_misses_total", model="simple") == 2
    assert sample(server, "sluice_cache_entries") == 0


async def test_invalid_input_is_refused_before_any_lookup(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    server = await start_server(repository=cached_repository(example_repository))
    client = stub(server, channel)
    bad = request()
    bad.inputs[0].shape[:] = [1, 15]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await infer(client, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(server, "sluice_cache_misses_total", model="simple") == 0


async def test_memory_stays_within_the_budget_under_many_distinct_calls(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    budget = 4 * (2 * 16 * 4 + ENTRY_OVERHEAD_BYTES)  # four answers of simple
    server = await start_server(
        repository=cached_repository(example_repository), cache={"max_bytes": budget}
    )
    client = stub(server, channel)
    for value in range(12):
        await infer(client, request(first=ONES * value))
        assert sample(server, "sluice_cache_bytes") <= budget
    assert sample(server, "sluice_cache_entries") == 4
    assert sample(server, "sluice_cache_evictions_total", model="simple") == 8
    _, trailers = await infer(client, request(first=ONES * 11))  # the newest stayed
    assert trailers["sluice-cache"] == "hit"
    _, trailers = await infer(client, request(first=ONES * 0))  # the oldest went
    assert "sluice-cache" not in trailers


async def test_a_zero_budget_turns_the_cache_off(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    server = await start_server(
        repository=cached_repository(example_repository), cache={"max_bytes": 0}
    )
    client = stub(server, channel)
    for _ in range(2):
        _, trailers = await infer(client, request())
        assert "sluice-cache" not in trailers
    assert (await statistics(client)).execution_count == 2
    assert sample(server, "sluice_cache_misses_total", model="simple") == 0


async def test_models_without_the_setting_are_not_cached(
    server: RunningServer, channel: list[grpc.aio.Channel]
) -> None:
    client = stub(server, channel)
    for _ in range(2):
        _, trailers = await infer(client, request())
        assert "sluice-cache" not in trailers
    assert (await statistics(client)).execution_count == 2


# -- shared by replicas through Redis -----------------------------------------------------


def test_an_entry_survives_its_wire_form_and_malformed_ones_are_refused() -> None:
    outputs = (
        OutputTensor("N", "FP32", np.arange(6, dtype="<f4").reshape(2, 3)),
        OutputTensor("S", "BYTES", np.array([b"a", b"bc"], dtype=object)),
    )
    original = Cached("simple", "1", "onnxruntime", outputs, entry_bytes(outputs))
    blob = codec.encode(original)
    back = codec.decode(blob, max_entry_bytes=100_000)
    assert (back.model, back.version, back.backend, back.nbytes) == (
        "simple",
        "1",
        "onnxruntime",
        original.nbytes,
    )
    for got, want in zip(back.outputs, outputs, strict=True):
        assert (got.name, got.datatype) == (want.name, want.datatype)
        np.testing.assert_array_equal(got.array, want.array)
        assert not got.array.flags.writeable
    malformed = [
        b"",
        b"\xff\xff\xff\xff{}",
        blob[:-1],  # an output cut short
        blob + b"x",  # bytes after the last output
        blob.replace(b'"FP32"', b'"FP99"'),
        blob.replace(b'"shape":[2,3]', b'"shape":[2,4]'),
        (2).to_bytes(4, "little") + b"[]",
    ]
    for bad in malformed:
        with pytest.raises(ValueError):
            codec.decode(bad, max_entry_bytes=100_000)
    with pytest.raises(ValueError):
        codec.decode(blob, max_entry_bytes=100)  # larger than any entry kept here


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path) as url:
        yield url


async def shared_keys(url: str) -> list[bytes]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return sorted(await client.keys("sluice:cache:*"))
    finally:
        await client.aclose()


async def wait_for_shared(url: str, count: int) -> list[bytes]:
    """Writes to Redis happen after the answer: wait until they are there."""
    async with asyncio.timeout(30):
        while len(keys := await shared_keys(url)) < count:
            await asyncio.sleep(0.01)
    return keys


async def test_a_replica_answers_from_what_another_shared(
    start_server: StartServer,
    example_repository: Path,
    tmp_path: Path,
    redis_url: str,
    channel: list[grpc.aio.Channel],
) -> None:
    other_copy = tmp_path / "replica"
    shutil.copytree(cached_repository(example_repository), other_copy)  # same files, elsewhere
    shared = {"redis_url": redis_url}
    one = await start_server(repository=example_repository, cache=shared)
    two = await start_server(repository=other_copy, cache=shared)
    computed, _ = await infer(stub(one, channel), request(first=ONES * 4))
    await wait_for_shared(redis_url, 1)
    client = stub(two, channel)
    answer, trailers = await infer(client, request(first=ONES * 4))
    assert trailers["sluice-cache"] == "hit"
    assert answer.raw_output_contents == computed.raw_output_contents
    assert (await statistics(client)).execution_count == 0
    assert sample(two, "sluice_cache_hits_total", model="simple") == 1
    # Now kept locally too: the next hit does not need Redis.
    _, trailers = await infer(client, request(first=ONES * 4))
    assert trailers["sluice-cache"] == "hit"


async def test_a_malformed_shared_entry_is_a_miss_never_an_answer(
    start_server: StartServer,
    example_repository: Path,
    tmp_path: Path,
    redis_url: str,
    channel: list[grpc.aio.Channel],
) -> None:
    other_copy = tmp_path / "replica"
    shutil.copytree(cached_repository(example_repository), other_copy)
    one = await start_server(repository=example_repository, cache={"redis_url": redis_url})
    two = await start_server(repository=other_copy, cache={"redis_url": redis_url})
    await infer(stub(one, channel), request())
    (key,) = await wait_for_shared(redis_url, 1)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set(key, (10).to_bytes(4, "little") + b'{"outputs": 1}')
    finally:
        await client.aclose()
    answer, trailers = await infer(stub(two, channel), request())
    assert "sluice-cache" not in trailers
    np.testing.assert_array_equal(
        np.frombuffer(answer.raw_output_contents[0], "<i4"), (ONES + ONES).ravel()
    )
    assert sample(two, "sluice_cache_shared_errors_total", operation="decode") == 1


async def test_an_unreachable_redis_costs_misses_never_calls(
    start_server: StartServer, example_repository: Path, channel: list[grpc.aio.Channel]
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    server = await start_server(
        repository=cached_repository(example_repository), cache={"redis_url": nowhere}
    )
    client = stub(server, channel)
    for _ in range(2):
        answer, _ = await infer(client, request(first=ONES * 2))
        np.testing.assert_array_equal(
            np.frombuffer(answer.raw_output_contents[0], "<i4"), (ONES * 3).ravel()
        )
    # The first call missed here and in Redis; its answer is kept here all the same.
    assert sample(server, "sluice_cache_hits_total", model="simple") == 1
    assert sample(server, "sluice_cache_shared_errors_total", operation="read") == 1
