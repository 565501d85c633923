"""Sizing messages without encoding them (``sluice.transport.wire_size``), and copying
large typed contents without starving the event loop of the GIL.

``size_bound`` decides, on the event loop, whether a reply is encoded there or in a worker
thread, and how many bytes a stream's window holds for a message: it must never answer
less than the encoded size, must answer "may be larger" for every message over the asked
bound, and must cost no more than a bounded walk, however many entries a message has.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice import tensors
from sluice.transport.interceptors._wrap import CallInfo, decoded_stream
from sluice.transport.rpcs import rpc
from sluice.transport.wire_size import (
    MAX_WALKED_ITEMS,
    encode_off_loop,
    received_message_bytes,
    size_bound,
)
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.sluice.v1 import generation_service_pb2 as gen

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

text = st.text(max_size=40)
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def parameters(draw: Any, target: Any) -> None:
    for key in draw(st.lists(text, max_size=4)):
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param"]))
        value = {
            "bool_param": st.booleans(),
            "int64_param": int64,
            "string_param": text,
            "double_param": st.floats(allow_nan=False),
        }[kind]
        setattr(target[key], kind, draw(value))


@st.composite
def infer_requests(draw: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(text), id=draw(text))
    draw(parameters(request.parameters))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(text), datatype=draw(text))
        tensor.shape.extend(draw(st.lists(int64, max_size=4)))
        field, values = draw(
            st.sampled_from(
                [
                    ("fp32_contents", st.floats(width=32, allow_nan=False)),
                    ("fp64_contents", st.floats(allow_nan=False)),
                    ("int_contents", st.integers(-(2**31), 2**31 - 1)),
                    ("int64_contents", int64),
                    ("uint64_contents", st.integers(0, 2**64 - 1)),
                    ("bool_contents", st.booleans()),
                    ("bytes_contents", st.binary(max_size=20)),
                ]
            )
        )
        getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=30)))
        draw(parameters(tensor.parameters))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
    return request


@PROPERTIES
@given(infer_requests(), st.integers(0, 4000))
def test_bound_is_never_below_the_encoded_size(request: pb.ModelInferRequest, above: int) -> None:
    size = request.ByteSize()
    unbounded = size_bound(request, above=1 << 40)
    assert unbounded is not None and unbounded >= size
    bound = size_bound(request, above=above)
    if size > above:
        assert bound is None
    elif bound is not None:
        assert size <= bound <= above


def test_bytes_and_fixed_width_numbers_are_counted_nearly_exactly() -> None:
    """What a large message holds (raw contents, floats) is counted as it is; only tags
    and length prefixes are counted at their widest."""
    response = pb.ModelInferResponse(model_name="echo", id="7")
    response.outputs.add(name="y", datatype="FP32", shape=[1, 250_000])
    response.raw_output_contents.append(bytes(1_000_000))
    stream = pb.ModelStreamInferResponse(infer_response=response)
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP64").contents.fp64_contents.extend([0.5] * 100_000)
    for message in (response, stream, request):
        bound = size_bound(message, above=1 << 30)
        assert bound is not None
        assert message.ByteSize() <= bound <= message.ByteSize() + 64


def test_a_message_with_many_entries_is_not_walked_to_the_end() -> None:
    many = pb.ModelInferRequest(model_name="m")
    for index in range(MAX_WALKED_ITEMS + 1):
        many.parameters[f"p{index}"].bool_param = True
    assert many.ByteSize() < 1024 * 1024
    assert size_bound(many, above=1 << 30) is None  # "may be larger": encoded off the loop
    fewer = pb.ModelInferRequest(model_name="m")
    for index in range(MAX_WALKED_ITEMS // 4):  # an entry and its value's field each count
        fewer.parameters[f"p{index}"].bool_param = True
    assert size_bound(fewer, above=1 << 30) is not None


def test_text_that_is_not_ascii_is_counted_at_its_widest() -> None:
    request = gen.GenerateRequest(prompt="日本語のテキスト" * 100)
    bound = size_bound(request, above=1 << 20)
    assert bound is not None and bound >= request.ByteSize()


async def test_a_stream_message_is_counted_as_it_arrived_unknown_fields_included() -> None:
    """A stream's byte window and admission count each request at the length it came with:
    fields the schema does not declare (which ``size_bound`` cannot see) included."""
    declared = pb.ModelInferRequest(model_name="m").SerializeToString()
    unknown = b"\xfa\x3f" + bytes([0x80, 0x80, 0x08]) + bytes(131072)  # field 1023, 128 KiB
    messages = [declared, declared + unknown]

    async def arriving() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    method = "/inference.GRPCInferenceService/ModelStreamInfer"
    call = CallInfo(method, "ModelStreamInfer", None, None, kind=rpc(method), streaming=True)
    seen = []
    async for request in decoded_stream(call, arriving(), pb.ModelInferRequest.FromString):
        assert request.model_name == "m"
        seen.append(received_message_bytes.get())
    assert seen == [len(declared), len(declared) + len(unknown)]
    bound = size_bound(pb.ModelInferRequest.FromString(messages[1]), above=1 << 30)
    assert bound is not None and bound < len(unknown)  # why requests are not sized by it


def test_a_reply_with_many_small_parts_is_left_to_a_thread_after_a_bounded_walk() -> None:
    """However a message is shaped, ``size_bound`` visits at most ``MAX_WALKED_ITEMS``
    fields and entries on the loop: past that, the answer is "may be larger"."""
    wide = pb.ModelInferRequest()
    for index in range(MAX_WALKED_ITEMS // 8):
        tensor = wide.inputs.add(name=f"x{index}", datatype="INT64", shape=[1])
        tensor.contents.int64_contents.append(index)
        tensor.parameters["p"].bool_param = True
    assert wide.ByteSize() < 64 * 1024
    assert size_bound(wide, above=1 << 30) is None
    narrow = pb.ModelInferRequest()
    for index in range(MAX_WALKED_ITEMS // 16):
        narrow.inputs.add(name=f"x{index}", datatype="INT64")
    assert size_bound(narrow, above=1 << 30) is not None


async def test_encode_off_loop_encodes_in_a_thread_only_what_may_be_large() -> None:
    threads: list[str] = []

    def serialize(message: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return bytes(message.SerializeToString())

    small = pb.ModelInferResponse(model_name="m")
    large = pb.ModelInferResponse(raw_output_contents=[bytes(2 * 1024 * 1024)])
    assert await encode_off_loop(serialize, small) == small.SerializeToString()
    assert await encode_off_loop(serialize, large) == large.SerializeToString()
    assert threads[0] == threading.current_thread().name
    assert threads[1] != threading.current_thread().name
    # A servicer that encoded its reply itself hands over the bytes; they pass as they are.
    assert await encode_off_loop(serialize, b"\x0a\x01m") == b"\x0a\x01m"
    assert len(threads) == 2


class _Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.mark.parametrize(
    "field,dtype", [("fp32_contents", np.float32), ("int64_contents", np.int64)]
)
async def test_typed_contents_copied_in_a_worker_pause_between_chunks(
    monkeypatch: pytest.MonkeyPatch, field: str, dtype: Any
) -> None:
    """A worker thread copying typed contents gives the GIL up between chunks (the event
    loop would otherwise wait the interpreter's switch interval each time it took the GIL
    back); on the event loop itself it never sleeps."""
    sleeps = _Sleeps()
    monkeypatch.setattr(tensors.time, "sleep", sleeps)
    contents = pb.InferTensorContents()
    count = 3 * tensors.TYPED_CHUNK_ELEMENTS + 5
    getattr(contents, field).extend(range(count))
    values = getattr(contents, field)
    if hasattr(values, "__array__"):
        pytest.skip("this protobuf copies a repeated field into an array in one C call")
    in_worker = await asyncio.to_thread(tensors._typed_array, values, dtype)
    assert np.array_equal(in_worker, np.arange(count, dtype=dtype))
    assert sleeps.calls == [tensors.GIL_PAUSE_S] * 3
    on_loop = tensors._typed_array(values, dtype)
    assert np.array_equal(on_loop, in_worker)
    assert len(sleeps.calls) == 3
    small = getattr(pb.InferTensorContents(), field)
    small.extend(range(tensors.TYPED_CHUNK_ELEMENTS))
    await asyncio.to_thread(tensors._typed_array, small, dtype)
    assert len(sleeps.calls) == 3  # one chunk: nothing to pause between
