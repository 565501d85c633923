"""The engine lane: unary calls reach a real server's handler chain over a Unix socket and
end exactly as the same calls over grpc do (same status, details, trailers, response bytes).

Each test compares the lane with grpc on the same running server: calls carry a fixed
``x-request-id``, so error details (which quote it) and trailers compare equal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter

from sluice.logs import Every
from sluice.tracing import Tracing
from sluice.workers import lane_client, shm
from sluice.workers.context import LaneContext
from sluice.workers.forward import GrpcForwarder
from sluice.workers.frames import (
    CALL,
    CANCEL,
    HEAD,
    MESSAGE,
    REPLY,
    CallFrame,
    FrameError,
    FrameReader,
    Oversize,
    Reply,
    credit_frame,
    decode_call,
    decode_credit,
    decode_headers,
    decode_reply,
    encode_call,
    encode_reply,
    frame,
    headers_frame,
)
from sluice.workers.lane import LaneClient, LaneMetrics, LaneServer, LaneSettings
from sluice.workers.lane_stream import LaneStream, Window
from sluice.workers.outbox import Outbox
from sluice.workers.transport import Proxy
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import model_service_pb2 as models_pb
from tests.certs import ADMIN_CN, Certificates
from tests.conftest import REPO_ROOT, RunningServer, StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository

INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
RID = (("x-request-id", "lane-test"),)

StartLane = Callable[..., Awaitable[LaneServer]]


@pytest.fixture
def socket_path(tmp_path: Path) -> AsyncIterator[Path] | Any:
    """The engine's socket: in ``tmp_path`` unless that is too long for a Unix socket."""
    path = tmp_path / "engine.sock"
    if len(str(path)) < 100:
        yield path
        return
    short = Path(tempfile.mkdtemp(prefix="lane-"))
    yield short / "engine.sock"
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def start_lane(start_server: StartServer, socket_path: Path) -> AsyncIterator[StartLane]:
    """Lane servers on ``socket_path`` for running servers; closed before the servers drain."""
    lanes: list[LaneServer] = []

    async def start(
        running: RunningServer, registry: CollectorRegistry | None = None, **settings: Any
    ) -> LaneServer:
        assert running.server.methods is not None
        lane = LaneServer(
            running.server.methods,
            max_message_bytes=running.settings.max_message_bytes,
            settings=LaneSettings(**settings),
            metrics=LaneMetrics(registry) if registry is not None else running.metrics.lane,
        )
        await lane.start(socket_path)
        lanes.append(lane)
        return lane

    yield start
    for lane in lanes:
        await lane.close()


@pytest.fixture
async def client(socket_path: Path) -> AsyncIterator[LaneClient]:
    lane = LaneClient(socket_path)
    yield lane
    await lane.close()


async def over_grpc(
    address: str,
    method: str,
    request: bytes,
    metadata: Sequence[tuple[str, str | bytes]] = RID,
    timeout: float | None = 30,  # noqa: ASYNC109 (the grpc call's own timeout)
) -> Reply:
    """The same call over grpc, as a ``Reply``."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)(request, metadata=metadata, timeout=timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return Reply(
                exc.code(),
                exc.details() or "",
                None,
                tuple(exc.initial_metadata() or ()),
                tuple(exc.trailing_metadata() or ()),
            )
        return Reply(
            grpc.StatusCode.OK,
            "",
            response,
            tuple(await call.initial_metadata() or ()),
            tuple(await call.trailing_metadata() or ()),
        )


def normal(reply: Reply) -> Reply:
    """``reply`` with its metadata in key order (grpc's core sends some keys first)."""
    return Reply(
        reply.code,
        reply.details,
        reply.response,
        tuple(sorted(reply.initial_metadata)),
        tuple(sorted(reply.trailing_metadata, key=lambda pair: pair[0])),
    )


def mlp_request(rows: np.ndarray, model: str = "mlp") -> bytes:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(rows.shape)
            )
        ],
        raw_input_contents=[rows.astype(np.float32).tobytes()],
    ).SerializeToString()


def fake_request(value: float = 1.0) -> bytes:
    return pb.ModelInferRequest(
        model_name="fake",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.full((1, 4), value, np.float32).tobytes()],
    ).SerializeToString()


def sample(running: RunningServer, name: str, **labels: str) -> float:
    return running.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(condition: Callable[[], bool], within_s: float = 60.0) -> None:
    """Wait (yielding to the server) until ``condition`` holds; a test fails rather than
    hangs when it never does."""
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.005)


def rows(seed: int, count: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 64), dtype=np.float32)


# The wire format.


def test_call_and_reply_frames_round_trip_text_and_binary_metadata() -> None:
    call = CallFrame(
        INFER,
        b"\x00request",
        (("k", "v"), ("trace-bin", b"\xff\x00")),
        1.5,
        "ipv4:10.0.0.7:5",
        (("x509_common_name", b"admin"),),
    )
    body = encode_call(7, call)[9:]
    assert decode_call(body) == call
    assert decode_call(encode_call(7, CallFrame(LIVE, b""))[9:]).timeout_s is None
    reply = Reply(
        grpc.StatusCode.UNAVAILABLE, "busy", None, (), (("grpc-retry-pushback-ms", "50"),)
    )
    assert decode_reply(encode_reply(3, reply)[9:]) == reply


def test_the_reader_cuts_frames_from_any_split_and_skips_oversize_ones() -> None:
    small = encode_call(1, CallFrame(LIVE, b"x" * 10))
    big = encode_call(2, CallFrame(INFER, bytes(range(256)) * 2000))  # beyond the scratch
    oversize = frame(CALL, 3, b"z" * 600_000)
    stream = small + big + oversize + small
    reader = FrameReader(max_body_bytes=550_000, scratch_bytes=4096)
    frames = []
    at = 0
    for step in (1, 7, 100, 4096, 65536):
        while at < len(stream):
            view = reader.buffer()
            n = min(step, len(view), len(stream) - at)
            view[:n] = stream[at : at + n]
            at += n
            frames += reader.feed(n)
            if step == 1 and at > 40:
                break
    assert [(kind, call_id) for kind, call_id, _ in frames] == [(1, 1), (1, 2), (1, 3), (1, 1)]
    assert decode_call(frames[0][2]) == CallFrame(LIVE, b"x" * 10)  # type: ignore[arg-type]
    assert bytes(decode_call(frames[1][2]).request) == bytes(range(256)) * 2000  # type: ignore[arg-type]
    assert frames[2][2] == Oversize(600_000)


class _Sink(asyncio.Protocol):
    """One end of a socket pair: hands the Outbox its transport's write signals."""

    def __init__(self) -> None:
        self.outbox: Outbox | None = None

    def pause_writing(self) -> None:
        assert self.outbox is not None
        self.outbox.pause()

    def resume_writing(self) -> None:
        assert self.outbox is not None
        self.outbox.resume()


async def test_the_outbox_keeps_frames_whole_and_in_order_and_signals_its_backlog() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport, sink = await loop.create_unix_connection(_Sink, sock=ours)
    backlog: list[bool] = []
    outbox = Outbox(transport, backlog_bytes=1024 * 1024, on_backlog=backlog.append)
    sink.outbox = outbox
    sent = [
        frame(REPLY, i, bytes([i]) * size)
        for i, size in enumerate((10, 3_000_000, 20, 700_000, 5, 2_000_000))
    ]
    for data in sent:
        outbox.put(data)
    assert backlog == [True]  # the peer has read nothing yet
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    received = await reader.readexactly(sum(map(len, sent)))
    assert received == b"".join(sent)
    await until(lambda: backlog == [True, False])
    transport.close()
    writer.close()
    await writer.wait_closed()


# Calls through a real server.


async def test_model_infer_answers_byte_for_byte_as_over_grpc(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    await start_lane(running)
    for seed in range(3):
        request = mlp_request(rows(seed, count=seed + 1))
        over_lane = await client.unary(INFER, request, RID, 30)
        expected = await over_grpc(running.address, INFER, request)
        assert over_lane.code is grpc.StatusCode.OK, over_lane.details
        assert normal(over_lane) == normal(expected)
        assert ("x-sluice-served-by", "mlp/2/onnxruntime") in over_lane.trailing_metadata or any(
            key == "x-sluice-served-by" for key, _ in over_lane.trailing_metadata
        )
    live = await client.unary(LIVE, pb.ServerLiveRequest().SerializeToString(), RID, None)
    assert pb.ServerLiveResponse.FromString(live.response or b"").live
    # The interceptors counted the lane's calls as the grpc ones.
    assert (
        sample(running, "sluice_requests_total", method="ModelInfer", model="mlp", code="OK") == 6
    )


async def test_bad_input_and_unknown_models_fail_with_grpcs_status_and_details(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    await start_lane(running)
    wrong_shape = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3])],
        raw_input_contents=[np.zeros(3, np.float32).tobytes()],
    ).SerializeToString()
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: wrong_shape,
        grpc.StatusCode.NOT_FOUND: mlp_request(rows(0), model="no-such-model"),
    }
    for code, request in cases.items():
        over_lane = await client.unary(INFER, request, RID, 30)
        assert over_lane.code is code
        assert normal(over_lane) == normal(await over_grpc(running.address, INFER, request))
    undecodable = b"\xff\xff\xff"
    over_lane = await client.unary(INFER, undecodable, RID, 30)
    assert over_lane.code is grpc.StatusCode.INVALID_ARGUMENT
    assert normal(over_lane) == normal(await over_grpc(running.address, INFER, undecodable))
    for method in ("/inference.GRPCInferenceService/NoSuchMethod", "/no.Such/Service"):
        over_lane = await client.unary(method, b"", RID, 30)
        assert normal(over_lane) == normal(await over_grpc(running.address, method, b""))
        assert over_lane.code is grpc.StatusCode.UNIMPLEMENTED
    streaming = await client.unary("/inference.GRPCInferenceService/ModelStreamInfer", b"", RID)
    assert streaming.code is grpc.StatusCode.UNIMPLEMENTED
    assert "takes a stream of requests" in streaming.details


def shared_files() -> list[str]:
    return sorted(path.name for path in shm.SHM_DIR.glob("sluice-lane-*"))


@pytest.mark.parametrize("shared_min_bytes", [1024 * 1024, 0], ids=["shared", "socket"])
async def test_a_large_request_crosses_and_fails_as_over_grpc(
    start_server: StartServer, start_lane: StartLane, socket_path: Path, shared_min_bytes: int
) -> None:
    running = await start_server()
    await start_lane(running)
    before = shared_files()
    # Declared one row, carrying 2 MiB: decoded off the loop (over 1 MiB), then refused.
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
        ],
        raw_input_contents=[bytes(range(256)) * 8192],
    ).SerializeToString()
    client = LaneClient(socket_path, shared_min_bytes=shared_min_bytes)
    try:
        over_lane = await client.unary(INFER, request, RID, 30)
    finally:
        await client.close()
    assert over_lane.code is grpc.StatusCode.INVALID_ARGUMENT
    assert normal(over_lane) == normal(await over_grpc(running.address, INFER, request))
    assert shared_files() == before  # the engine removed the shared file it took


async def test_requests_in_shared_memory_answer_byte_for_byte_and_leave_nothing_behind(
    start_server: StartServer, start_lane: StartLane, socket_path: Path
) -> None:
    running = await start_server(max_message_bytes=16384)
    await start_lane(running)
    before = shared_files()
    client = LaneClient(socket_path, shared_min_bytes=1024)
    try:
        request = mlp_request(rows(3, count=16))  # 4 KiB of floats: shared
        over_lane = await client.unary(INFER, request, RID, 30)
        assert over_lane.code is grpc.StatusCode.OK, over_lane.details
        assert normal(over_lane) == normal(await over_grpc(running.address, INFER, request))
        too_large = await client.unary(INFER, b"\x00" * 20000, RID, 30)
        assert too_large.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert too_large.details == "Received message larger than max (20000 vs. 16384)"
    finally:
        await client.close()
    assert shared_files() == before


@pytest.fixture
async def held(
    start_server: StartServer, tmp_path: Path
) -> AsyncIterator[tuple[RunningServer, Behaviour]]:
    """A server whose ``fake`` model holds every batch until the test releases it."""
    behaviour = Behaviour()
    behaviour.hold()
    running = await start_server(
        repository=fake_repository(tmp_path / "models"),
        backends=fake_backends(behaviour),
        admission={"max_inflight_requests": 2},
    )
    yield running, behaviour
    behaviour.release()


async def test_a_call_past_its_deadline_ends_deadline_exceeded_and_stops_in_the_engine(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, client: LaneClient
) -> None:
    running, _ = held
    await start_lane(running)

    def ended(code: str) -> float:
        return sample(
            running, "sluice_requests_total", method="ModelInfer", model="fake", code=code
        )

    over_lane = await client.unary(INFER, fake_request(), RID, 0.2)
    assert over_lane == Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None, (), ())
    # The engine ended the call itself, through its deadline hook: nothing of it is left.
    await until(lambda: ended("DEADLINE_EXCEEDED") == 1)
    assert sample(running, "sluice_lane_calls") == 0
    assert sample(running, "sluice_inflight_requests") == 0
    assert ended("CANCELLED") == 0
    # Over grpc the caller gets the same code; which side's message wins (the client's
    # own deadline or the server's deadline hook) and what the engine records are races
    # there, so they are not compared.
    over_grpc_reply = await over_grpc(running.address, INFER, fake_request(), timeout=0.2)
    assert over_grpc_reply.code is grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: sample(running, "sluice_inflight_requests") == 0)


async def test_a_cancelled_caller_cancels_its_call_in_the_engine(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, client: LaneClient
) -> None:
    running, behaviour = held
    await start_lane(running)
    call = asyncio.ensure_future(client.unary(INFER, fake_request(), RID, 30))
    await behaviour.started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The interceptors saw a cancellation, as grpc's own would show it.
    await until(
        lambda: (
            sample(
                running,
                "sluice_requests_total",
                method="ModelInfer",
                model="fake",
                code="CANCELLED",
            )
            == 1
        )
    )
    assert sample(running, "sluice_lane_calls") == 0
    behaviour.release()
    assert (await client.unary(INFER, fake_request(), RID, 30)).code is grpc.StatusCode.OK


async def test_admission_refusal_carries_the_pushback_trailer_as_over_grpc(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, client: LaneClient
) -> None:
    running, behaviour = held
    await start_lane(running)
    holding = [
        asyncio.ensure_future(client.unary(INFER, fake_request(), RID, 30)) for _ in range(2)
    ]
    await until(lambda: sample(running, "sluice_inflight_requests") == 2)
    refused = await client.unary(INFER, fake_request(), RID, 30)
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert ("grpc-retry-pushback-ms", "50") in refused.trailing_metadata
    assert normal(refused) == normal(await over_grpc(running.address, INFER, fake_request()))
    behaviour.release()
    assert [reply.code for reply in await asyncio.gather(*holding)] == [grpc.StatusCode.OK] * 2


async def test_admin_calls_need_the_bearer_token_as_over_grpc(
    start_server: StartServer, start_lane: StartLane, client: LaneClient, example_repository: Path
) -> None:
    running = await start_server(
        repository=example_repository, host="0.0.0.0", admin={"token": "s3cret"}
    )
    await start_lane(running)
    promote = "/sluice.v1.ModelService/PromoteModel"
    request = models_pb.PromoteModelRequest(model_name="mlp", version="2").SerializeToString()
    for authorization in ((), (("authorization", "Bearer wrong"),)):
        metadata = (*RID, *authorization)
        refused = await client.unary(promote, request, metadata, 30)
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED
        assert normal(refused) == normal(
            await over_grpc(running.address, promote, request, metadata)
        )
    allowed = await client.unary(promote, request, (*RID, ("authorization", "Bearer s3cret")), 30)
    assert allowed.code is grpc.StatusCode.OK, allowed.details


async def test_oversize_messages_and_frames_are_refused_and_the_connection_goes_on(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server(max_message_bytes=4096)
    await start_lane(running, max_metadata_bytes=1024)
    over_message = b"\x00" * 5000  # over the message limit, inside the frame limit
    refused = await client.unary(INFER, over_message, RID, 30)
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details == "Received message larger than max (5000 vs. 4096)"
    assert (await over_grpc(running.address, INFER, over_message)).code is refused.code
    over_frame = await client.unary(INFER, b"\x00" * 100_000, RID, 30)
    assert over_frame.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample(running, "sluice_lane_refused_total", reason="frame") == 2
    live = await client.unary(LIVE, pb.ServerLiveRequest().SerializeToString(), RID, 30)
    assert live.code is grpc.StatusCode.OK
    assert sample(running, "sluice_lane_connections") == 1


async def test_many_concurrent_calls_share_one_connection(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    await start_lane(running)
    requests = [rows(seed) for seed in range(64)]
    replies = await asyncio.gather(
        *(client.unary(INFER, mlp_request(x), RID, 30) for x in requests)
    )
    assert sample(running, "sluice_lane_connections") == 1
    for x, reply in zip(requests, replies, strict=True):
        assert reply.code is grpc.StatusCode.OK, reply.details
        alone = await over_grpc(running.address, INFER, mlp_request(x))
        ours = pb.ModelInferResponse.FromString(reply.response or b"")
        theirs = pb.ModelInferResponse.FromString(alone.response or b"")
        for mine, other in zip(ours.raw_output_contents, theirs.raw_output_contents, strict=True):
            np.testing.assert_allclose(
                np.frombuffer(mine, np.float32), np.frombuffer(other, np.float32), rtol=1e-5
            )


async def test_calls_over_the_connection_limit_are_refused(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, client: LaneClient
) -> None:
    running, behaviour = held
    await start_lane(running, max_calls_per_connection=2)
    holding = [
        asyncio.ensure_future(client.unary(INFER, fake_request(), RID, 30)) for _ in range(2)
    ]
    await until(lambda: sample(running, "sluice_lane_calls") == 2)
    refused = await client.unary(INFER, fake_request(), RID, 30)
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_calls_per_connection" in refused.details
    assert sample(running, "sluice_lane_refused_total", reason="calls") == 1
    assert sample(running, "sluice_lane_max_calls_per_connection") == 2
    behaviour.release()
    assert [reply.code for reply in await asyncio.gather(*holding)] == [grpc.StatusCode.OK] * 2


async def test_the_client_reconnects_after_the_engine_restarts(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    lane = await start_lane(running)
    request = mlp_request(rows(1))
    assert (await client.unary(INFER, request, RID, 30)).code is grpc.StatusCode.OK
    await lane.close()
    down = await client.unary(INFER, request, RID, 30)
    assert down.code is grpc.StatusCode.UNAVAILABLE
    await start_lane(running, registry=CollectorRegistry())
    again = await client.unary(INFER, request, RID, 30)
    assert normal(again) == normal(await over_grpc(running.address, INFER, request))


# A transport in another process.


async def lane_process(
    socket: Path, method: str, request: bytes, *args: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.lane_process",
        str(socket),
        method,
        request.hex(),
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def test_a_client_in_another_process_gets_grpcs_answers(
    start_server: StartServer,
    start_lane: StartLane,
    socket_path: Path,
    processes: list[asyncio.subprocess.Process],
) -> None:
    running = await start_server()
    await start_lane(running)
    request = mlp_request(rows(5, count=4))
    proc = await lane_process(socket_path, INFER, request, "3")
    processes.append(proc)
    out, _ = await proc.communicate()
    lines = out.decode().splitlines()
    assert lines[0] == "started"
    expected = await over_grpc(running.address, INFER, request, (("x-request-id", "lane-process"),))
    assert expected.response is not None
    for line in lines[1:]:
        reply = json.loads(line)
        assert reply["code"] == "OK"
        assert bytes.fromhex(reply["response"]) == expected.response
        assert [tuple(pair) for pair in reply["trailing"]] == list(expected.trailing_metadata)
    assert len(lines) == 4


async def test_a_transport_process_that_dies_cancels_its_calls_in_the_engine(
    held: tuple[RunningServer, Behaviour],
    start_lane: StartLane,
    socket_path: Path,
    processes: list[asyncio.subprocess.Process],
) -> None:
    running, _ = held
    await start_lane(running)
    proc = await lane_process(socket_path, INFER, fake_request(), "2")
    processes.append(proc)
    await until(lambda: sample(running, "sluice_lane_calls") == 2)
    proc.kill()
    await proc.wait()
    await until(lambda: sample(running, "sluice_lane_calls") == 0)
    await until(
        lambda: (
            sample(
                running,
                "sluice_requests_total",
                method="ModelInfer",
                model="fake",
                code="CANCELLED",
            )
            == 2
        )
    )
    assert sample(running, "sluice_lane_connections") == 0


# A public port that forwards through the lane: a transport worker's own proxy.


@pytest.fixture
async def public_port(client: LaneClient) -> AsyncIterator[str]:
    # Calls that stream requests are not served here (none of these tests makes one).
    streams = GrpcForwarder("unix:/nonexistent", max_message_bytes=1024)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (Proxy(unary=client, streams=streams, index=0, tracing=Tracing.off(), responses=client),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)
    await streams.close()


async def test_a_forwarding_port_answers_as_the_engines_own_port(
    start_server: StartServer, start_lane: StartLane, public_port: str
) -> None:
    running = await start_server()
    await start_lane(running)
    request = mlp_request(rows(9, count=2))
    for timeout in (30, None):
        forwarded = await over_grpc(public_port, INFER, request, timeout=timeout)
        assert forwarded.code is grpc.StatusCode.OK
        assert normal(forwarded) == normal(await over_grpc(running.address, INFER, request))
    missing = mlp_request(rows(0), model="no-such-model")
    forwarded = await over_grpc(public_port, INFER, missing)
    assert forwarded.code is grpc.StatusCode.NOT_FOUND
    assert normal(forwarded) == normal(await over_grpc(running.address, INFER, missing))


async def test_a_forwarded_refusal_keeps_its_pushback_and_rich_details(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, public_port: str
) -> None:
    running, behaviour = held
    await start_lane(running)
    holding = [asyncio.ensure_future(over_grpc(public_port, INFER, fake_request())) for _ in "ab"]
    await until(lambda: sample(running, "sluice_inflight_requests") == 2)
    refused = await over_grpc(public_port, INFER, fake_request())
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert normal(refused) == normal(await over_grpc(running.address, INFER, fake_request()))
    assert {key for key, _ in refused.trailing_metadata} >= {
        "grpc-retry-pushback-ms",
        "grpc-status-details-bin",
    }
    behaviour.release()
    assert [reply.code for reply in await asyncio.gather(*holding)] == [grpc.StatusCode.OK] * 2
    behaviour.hold()
    late = await over_grpc(public_port, INFER, fake_request(), timeout=0.2)
    assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: sample(running, "sluice_lane_calls") == 0)


async def test_calls_in_flight_when_the_engine_goes_away_end_unavailable(
    held: tuple[RunningServer, Behaviour], start_lane: StartLane, client: LaneClient
) -> None:
    running, _ = held
    lane = await start_lane(running)
    call = asyncio.ensure_future(client.unary(INFER, fake_request(), RID, 30))
    await until(lambda: sample(running, "sluice_lane_calls") == 1)
    await lane.close()
    reply = await call
    assert reply.code is grpc.StatusCode.UNAVAILABLE
    assert "closed before the call finished" in reply.details
    # The engine stopped the call it could no longer answer.
    await until(
        lambda: (
            sample(
                running,
                "sluice_requests_total",
                method="ModelInfer",
                model="fake",
                code="CANCELLED",
            )
            == 1
        )
    )


async def test_a_forwarded_certificate_identity_opens_the_admin_plane(
    start_server: StartServer,
    start_lane: StartLane,
    client: LaneClient,
    example_repository: Path,
    certificates: Certificates,
) -> None:
    running = await start_server(
        repository=example_repository,
        tls=certificates.server_settings(),
        admin={"identities": [ADMIN_CN]},
    )
    await start_lane(running)
    promote = "/sluice.v1.ModelService/PromoteModel"
    request = models_pb.PromoteModelRequest(model_name="mlp", version="2").SerializeToString()
    tls = (("transport_security_type", b"ssl"),)
    someone = (*tls, ("x509_common_name", b"someone-else"))
    refused = await client.unary(promote, request, RID, 30, peer="ipv4:10.0.0.7:5", auth=someone)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert "client certificate named in admin.identities" in refused.details
    admin = (*tls, ("x509_common_name", ADMIN_CN.encode()))
    allowed = await client.unary(promote, request, RID, 30, peer="ipv4:10.0.0.7:5", auth=admin)
    assert allowed.code is grpc.StatusCode.OK, allowed.details


def unary_methods() -> list[tuple[str, bytes]]:
    """Every unary method the server has (its admin calls aside: they change what is
    served), each with a request naming ``mlp`` where the message has a model name."""
    from google.protobuf import message_factory
    from grpc_health.v1 import health_pb2

    from sluice.transport.rpcs import rpc
    from sluice_api.sluice.v1 import generation_service_pb2 as gen_pb

    services = [
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        models_pb.DESCRIPTOR.services_by_name["ModelService"],
        gen_pb.DESCRIPTOR.services_by_name["GenerationService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    calls = []
    for service in services:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming or method.server_streaming or rpc(path).admin:
                continue
            message = message_factory.GetMessageClass(method.input_type)()
            for field in ("model_name", "name"):
                if field in method.input_type.fields_by_name:
                    setattr(message, field, "mlp")
            calls.append((path, message.SerializeToString()))
    return calls


async def test_every_unary_method_answers_as_over_grpc(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    await start_lane(running)
    methods = unary_methods()
    assert len(methods) >= 15
    for method, request in methods:
        over_lane = await client.unary(method, request, RID, 30)
        assert normal(over_lane) == normal(await over_grpc(running.address, method, request)), (
            method
        )


async def test_a_call_cancelled_in_the_frame_read_with_it_is_forgotten_by_the_engine(
    start_server: StartServer, start_lane: StartLane, socket_path: Path
) -> None:
    # A busy engine reads a call and its cancel in one read: the call's task is cancelled
    # before it ever runs. It must still leave the connection's table (and the gauge), or
    # such calls pile up until the connection refuses every call.
    running = await start_server()
    await start_lane(running, max_calls_per_connection=3)
    reader, writer = await asyncio.open_unix_connection(str(socket_path))

    async def replies(count: int) -> list[tuple[int, int, grpc.StatusCode, str]]:
        got = []
        for _ in range(count):
            length, kind, call_id = HEAD.unpack(await reader.readexactly(HEAD.size))
            reply = decode_reply(await reader.readexactly(length))
            got.append((kind, call_id, reply.code, reply.details))
        return sorted(got)

    try:
        live = CallFrame(LIVE, pb.ServerLiveRequest().SerializeToString(), RID, 30.0)
        pairs = b"".join(encode_call(i, live) + frame(CANCEL, i) for i in range(2))
        writer.write(pairs + encode_call(7, live))
        await writer.drain()
        assert await replies(1) == [(REPLY, 7, grpc.StatusCode.OK, "")]
        # The connection's limit is whole again: three calls at once all run.
        writer.write(b"".join(encode_call(i, live) for i in (8, 9, 10)))
        await writer.drain()
        assert await replies(3) == [(REPLY, i, grpc.StatusCode.OK, "") for i in (8, 9, 10)]
        await until(lambda: sample(running, "sluice_lane_calls") == 0)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_request_that_cannot_go_into_shared_memory_crosses_the_socket(
    start_server: StartServer,
    start_lane: StartLane,
    socket_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /dev/shm full (a container's 64 MiB default) or gone: the call is not lost for it.
    running = await start_server()
    await start_lane(running)
    client = LaneClient(socket_path, shared_min_bytes=1024)
    assert client.shared_min_bytes == 1024
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "no-such-dir")
    monkeypatch.setattr(lane_client, "_SHM_FALLBACKS", Every(60.0))
    try:
        request = mlp_request(rows(5, count=16))
        with caplog.at_level(logging.WARNING, logger=lane_client.__name__):
            for _ in range(5):
                over_lane = await client.unary(INFER, request, RID, 30)
                assert over_lane.code is grpc.StatusCode.OK, over_lane.details
        assert normal(over_lane) == normal(await over_grpc(running.address, INFER, request))
    finally:
        await client.close()
    # Said once, not once per request: a caller cannot fill the log with it.
    said = [r.getMessage() for r in caplog.records if "goes by the socket" in r.getMessage()]
    assert len(said) == 1, said


def test_a_repeated_warning_is_let_through_once_per_interval_with_a_count() -> None:
    now = [100.0]
    every = Every(60.0, clock=lambda: now[0])
    assert every.due() == 0
    assert [every.due() for _ in range(3)] == [None, None, None]
    now[0] += 59.9
    assert every.due() is None
    now[0] += 0.1
    assert every.due() == 4
    assert every.due() is None


def test_a_sweep_removes_what_dead_senders_left_and_nothing_else() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = int(gone.stdout)
    names = {
        "dead": f"sluice-lane-{dead}-{'c' * 32}",
        "alive": f"sluice-lane-{os.getpid()}-{'d' * 32}",
        "other": f"other-{dead}-{'e' * 32}",
    }
    for name in names.values():
        (shm.SHM_DIR / name).write_bytes(b"x")
    try:
        assert shm.sweep(None) >= 1
        assert not (shm.SHM_DIR / names["dead"]).exists()
        assert (shm.SHM_DIR / names["alive"]).exists()  # its sender still runs
        assert (shm.SHM_DIR / names["other"]).exists()  # not a lane file
        assert shm.sweep(os.getpid()) == 1  # a sender that has exited: all of its files
        assert not (shm.SHM_DIR / names["alive"]).exists()
    finally:
        for name in names.values():
            (shm.SHM_DIR / name).unlink(missing_ok=True)


# Calls whose responses stream (Generate, health Watch): MESSAGE frames within a window.

GENERATE = "/sluice.v1.GenerationService/Generate"
WATCH = "/grpc.health.v1.Health/Watch"


def generate_request(max_new_tokens: int, prompt: str = "hello there") -> bytes:
    return gen.GenerateRequest(
        model_name="tiny_llama",
        prompt=prompt,
        parameters=gen.SamplingParameters(max_new_tokens=max_new_tokens, temperature=0.0),
    ).SerializeToString()


async def read_all(stream: LaneStream) -> tuple[list[bytes], Reply]:
    """A stream's responses, taken as a transport takes them, and its status."""
    responses: list[bytes] = []
    while not isinstance(item := await asyncio.wait_for(stream.next(), 30), Reply):
        assert isinstance(item, bytes)  # nothing here sends initial metadata
        responses.append(item)
        stream.taken(len(item))
    return responses, item


async def generate_over_grpc(address: str, request: bytes) -> tuple[list[bytes], Reply]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(GENERATE)(request, metadata=RID, timeout=60)
        responses: list[bytes] = []
        with contextlib.suppress(grpc.aio.AioRpcError):  # the status is read below
            responses.extend([response async for response in call])
        return responses, Reply(
            await call.code(),
            await call.details() or "",
            None,
            tuple(await call.initial_metadata() or ()),
            tuple(await call.trailing_metadata() or ()),
        )


def held_bytes(stream: LaneStream) -> int:
    return sum(len(item) for item in stream._items if isinstance(item, bytes))


def tokens(responses: list[bytes]) -> int:
    return sum(len(gen.GenerateResponse.FromString(r).token_ids) for r in responses)


def test_headers_and_credit_frames_round_trip() -> None:
    metadata = (("x-one", "1"), ("x-two-bin", b"\x00\xff"))
    body = headers_frame(5, metadata)[HEAD.size :]
    assert decode_headers(body) == metadata
    assert decode_headers(headers_frame(5, ())[HEAD.size :]) == ()
    assert decode_credit(credit_frame(5, 70_000)[HEAD.size :]) == 70_000
    with pytest.raises(FrameError):
        decode_headers(body[:-1])
    with pytest.raises(FrameError):
        decode_credit(b"\x01\x00")


async def test_a_streaming_context_sends_its_headers_once_before_its_first_response() -> None:
    sent: list[object] = []

    class Recording:
        def headers(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
            sent.append(("headers", metadata))

        async def message(self, data: bytes) -> None:
            sent.append(data)

    context = LaneContext((), deadline=None)
    with pytest.raises(grpc.aio.UsageError):
        await context.write(b"unary")  # a unary call has no stream
    context.stream_to(Recording(), None)
    await context.send_initial_metadata((("x-first", "1"),))
    await context.write(b"one")
    await context.write(b"two")
    assert sent == [("headers", (("x-first", "1"),)), b"one", b"two"]
    assert context.initial == ()  # sent already: not again with the status
    with pytest.raises(grpc.aio.UsageError):
        await context.send_initial_metadata((("x-again", "2"),))
    # As grpc: once a response went (with or without metadata), none can follow it.
    late = LaneContext((), deadline=None)
    late.stream_to(Recording(), None)
    await late.write(b"first")
    with pytest.raises(grpc.aio.UsageError):
        await late.send_initial_metadata((("x-late", "1"),))
    # Without explicit initial metadata, none is sent; a serializer encodes what is written.
    sent.clear()
    quiet = LaneContext((), deadline=None)
    quiet.stream_to(Recording(), lambda message: message.SerializeToString())
    await quiet.write(gen.GenerateResponse(text="hi"))
    assert sent == [gen.GenerateResponse(text="hi").SerializeToString()]


async def test_a_window_holds_responses_until_credit_and_refuses_oversize_ones() -> None:
    sent: list[tuple[bytes | bytearray | memoryview, ...]] = []
    waits = Counter("waits", "", registry=CollectorRegistry())
    context = LaneContext((), deadline=None)
    window = Window(
        lambda *pieces: sent.append(pieces),
        3,
        context,
        limit=100,
        max_message_bytes=60,
        waits=waits,
    )
    await window.message(b"a" * 50)
    await window.message(b"b" * 50)  # 118 bytes ahead with their heads: the window is full
    third = asyncio.ensure_future(window.message(b"c" * 10))
    await asyncio.sleep(0.01)
    assert not third.done() and len(sent) == 2 and waits._value.get() == 1
    window.credit(10)  # 108 ahead: still full
    await asyncio.sleep(0.01)
    assert not third.done()
    window.credit(59)  # 49 ahead
    await asyncio.wait_for(third, 5)
    assert [b"".join(bytes(p) for p in pieces)[HEAD.size :] for pieces in sent] == [
        b"a" * 50,
        b"b" * 50,
        b"c" * 10,
    ]
    assert {HEAD.unpack_from(pieces[0])[1:] for pieces in sent} == {(MESSAGE, 3)}
    # Two writers waiting on a full window both go on once there is room.
    await window.message(b"d" * 60)
    waiting = [asyncio.ensure_future(window.message(bytes([i]) * 10)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)
    window.credit(1000)
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert len(sent) == 6
    with pytest.raises(grpc.aio.AbortError):
        await window.message(b"x" * 61)
    assert context.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max (61 vs. 60)" in context.details()
    assert len(sent) == 6


async def test_generate_streams_over_the_lane_as_over_grpc(
    server: RunningServer, start_lane: StartLane, client: LaneClient
) -> None:
    await start_lane(server)
    request = generate_request(24)
    responses, reply = await read_all(await client.stream(GENERATE, request, RID, 60))
    expected, expected_reply = await generate_over_grpc(server.address, request)
    assert reply.code is grpc.StatusCode.OK
    assert responses == expected and tokens(responses) >= 1
    assert normal(reply) == normal(expected_reply)
    # A request the servicer refuses ends with grpc's status and details, and no response.
    bad = gen.GenerateRequest(model_name="no-such-model", prompt="x").SerializeToString()
    refused, refused_reply = await read_all(await client.stream(GENERATE, bad, RID, 60))
    grpc_refused, grpc_reply = await generate_over_grpc(server.address, bad)
    assert refused == grpc_refused == []
    assert refused_reply.code is grpc.StatusCode.NOT_FOUND
    assert normal(refused_reply) == normal(grpc_reply)
    await until(lambda: sample(server, "sluice_lane_calls") == 0)


async def test_a_stream_whose_caller_stops_reading_waits_within_its_window(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    window = 1024
    lane = await start_lane(running, stream_window_bytes=window)
    client.stream_window_bytes = window
    request = generate_request(200, prompt="a")
    expected, _ = await generate_over_grpc(running.address, request)
    assert sum(len(r) + HEAD.size for r in expected) > 2 * window  # the window must fill
    stream = await client.stream(GENERATE, request, RID, 60)
    await until(lambda: sample(running, "sluice_lane_stream_waits_total") >= 1, within_s=20)
    await asyncio.sleep(0.05)  # nothing more arrives while the caller does not read
    largest = max(len(r) for r in expected)
    assert 0 < held_bytes(stream) <= window + largest
    assert lane.metrics.stream_window_bytes._value.get() == window
    # Read, and it goes on to the end: nothing was lost on the way.
    responses, reply = await read_all(stream)
    assert reply.code is grpc.StatusCode.OK
    assert responses == expected
    await until(lambda: sample(running, "sluice_lane_calls") == 0)


async def test_a_cancelled_stream_ends_its_generation_in_the_engine(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    await start_lane(running, stream_window_bytes=1024)
    client.stream_window_bytes = 1024
    stream = await client.stream(GENERATE, generate_request(200, prompt="a"), RID, 60)
    assert isinstance(await stream.next(), bytes)
    stream.cancel()
    await until(lambda: sample(running, "sluice_lane_calls") == 0)
    await until(
        lambda: (
            sample(
                running,
                "sluice_requests_total",
                method="Generate",
                model="tiny_llama",
                code="CANCELLED",
            )
            == 1
        )
    )
    # A call made in the other shape is a transport's bug: refused, and nothing runs.
    wrong = await client.unary(GENERATE, generate_request(200, prompt="a"), RID, 60)
    assert wrong.code is grpc.StatusCode.INTERNAL
    assert "streams its responses; it was called unary" in wrong.details
    live = await read_all(await client.stream(LIVE, pb.ServerLiveRequest().SerializeToString()))
    assert live[0] == [] and live[1].code is grpc.StatusCode.INTERNAL
    assert "is unary; it was called with streamed responses" in live[1].details
    await until(lambda: sample(running, "sluice_lane_calls") == 0)


async def test_a_stream_cut_when_the_engine_goes_away_ends_unavailable_never_ok(
    start_server: StartServer, start_lane: StartLane, client: LaneClient
) -> None:
    running = await start_server()
    lane = await start_lane(running, stream_window_bytes=1024)
    client.stream_window_bytes = 1024
    stream = await client.stream(GENERATE, generate_request(200, prompt="a"), RID, 60)
    await until(lambda: sample(running, "sluice_lane_stream_waits_total") >= 1)
    await lane.close()
    responses, reply = await read_all(stream)
    assert responses  # those already sent are delivered, then the status says it was cut
    assert reply.code is grpc.StatusCode.UNAVAILABLE
    assert "closed before the call finished" in reply.details


async def test_health_watch_streams_over_the_lane_until_its_caller_leaves(
    server: RunningServer, start_lane: StartLane, client: LaneClient
) -> None:
    await start_lane(server)
    stream = await client.stream(WATCH, health_pb2.HealthCheckRequest().SerializeToString())
    first = await stream.next()
    assert isinstance(first, bytes)
    status = health_pb2.HealthCheckResponse.FromString(first).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert sample(server, "sluice_lane_calls") == 1
    stream.cancel()
    await until(lambda: sample(server, "sluice_lane_calls") == 0)


async def test_generate_through_a_forwarding_port_and_its_deadline(
    start_server: StartServer, start_lane: StartLane, public_port: str
) -> None:
    running = await start_server()
    await start_lane(running)
    request = generate_request(16)
    forwarded, forwarded_reply = await generate_over_grpc(public_port, request)
    expected, expected_reply = await generate_over_grpc(running.address, request)
    assert forwarded == expected and forwarded_reply.code is grpc.StatusCode.OK
    assert normal(forwarded_reply) == normal(expected_reply)
    # A deadline the generation cannot meet ends it DEADLINE_EXCEEDED, here and in the
    # engine (which ends it itself: the transport sends no cancel past the deadline).
    async with grpc.aio.insecure_channel(public_port) as channel:
        call = channel.unary_stream(GENERATE)(generate_request(200), timeout=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            async for _ in call:
                await asyncio.sleep(0.01)  # a slow reader
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: sample(running, "sluice_lane_calls") == 0)

    def ended(code: str) -> float:
        return sample(
            running, "sluice_requests_total", method="Generate", model="tiny_llama", code=code
        )

    assert (ended("DEADLINE_EXCEEDED"), ended("CANCELLED")) == (1, 0)


async def test_a_generation_longer_than_its_window_through_a_forwarding_port(
    start_server: StartServer, start_lane: StartLane, client: LaneClient, public_port: str
) -> None:
    """The forwarding port gives credit as it writes: a generation many windows long ends
    whole and OK (without credit it would wait at the first window until its deadline)."""
    running = await start_server()
    await start_lane(running)
    client.stream_window_bytes = 1024
    request = generate_request(200, prompt="a")
    expected, expected_reply = await generate_over_grpc(running.address, request)
    assert sum(len(r) + HEAD.size for r in expected) > 4 * 1024
    forwarded, reply = await generate_over_grpc(public_port, request)
    assert reply.code is grpc.StatusCode.OK
    assert forwarded == expected
    assert normal(reply) == normal(expected_reply)
    await until(lambda: sample(running, "sluice_lane_calls") == 0)


async def test_streams_have_their_own_limit_and_leave_unary_calls_their_room(
    server: RunningServer, start_lane: StartLane, client: LaneClient
) -> None:
    await start_lane(server, max_streams_per_connection=2, max_calls_per_connection=1)
    watch = health_pb2.HealthCheckRequest().SerializeToString()
    watches = [await client.stream(WATCH, watch) for _ in range(2)]
    for stream in watches:
        assert isinstance(await stream.next(), bytes)
    assert sample(server, "sluice_lane_streams") == 2
    refused = await read_all(await client.stream(WATCH, watch))
    assert refused[1].code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "running 2 streams" in refused[1].details
    assert "max_streams_per_connection" in refused[1].details
    assert sample(server, "sluice_lane_refused_total", reason="streams") == 1
    # The unary calls' room is their own: two open watches take none of it.
    assert (await client.unary(LIVE, b"", RID, 30)).code is grpc.StatusCode.OK
    for stream in watches:
        stream.cancel()
    await until(lambda: sample(server, "sluice_lane_streams") == 0)
    assert sample(server, "sluice_lane_calls") == 0
