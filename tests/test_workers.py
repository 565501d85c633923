"""``sluice serve --workers 2``: two transport processes in front of one engine, tested over
the real wire (a real process on 127.0.0.1, port 0; separate channels land on separate
connections, which the kernel spreads over the transports)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from sluice.executors.base import Executor, LoadOptions
from sluice.executors.registry import BackendRegistry
from sluice.repository import EXAMPLE_REPOSITORY
from sluice.settings import load_settings
from sluice.transport.identity import (
    IDENTITY_KEY,
    PEER_KEY,
    TRANSPORT_KEY,
    forwarded_names,
    outgoing,
)
from sluice.workers import shm, topology
from sluice.workers.child import Child
from sluice.workers.lane import LaneServer
from sluice.workers.topology import EngineSocket, Transports, transport_environment
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from sluice_api.sluice.v1 import model_service_pb2 as models
from sluice_api.sluice.v1 import model_service_pb2_grpc as models_grpc
from sluice_client.names import PUSHBACK_KEY, REQUEST_ID_KEY
from tests.certs import ADMIN_CN, Certificates
from tests.conftest import StartServer
from tests.fakes import Behaviour, FakeFactory, fake_repository
from tests.models import write_identity
from tests.observability.collector import Collector
from tests.procfs import alive, children, cpu_seconds, environment, status_bytes
from tests.serve_process import ServeProcess, serve_process

WORKERS = ("--workers", "2")
METRICS_URL = r"metrics on (http://\S+/metrics)"
CHANNELS = 8
"""Separate connections: the chance that all land on one of two transports is 1 in 128."""


def echo_repository(root: Path, *, delay_us: int = 0, extra: str = "") -> Path:
    """``echo`` (FP32 ``x`` [batch, -1] -> ``y``), versions 1 and 2, both served."""
    write_identity(root, "echo")
    shutil.copytree(root / "echo" / "1", root / "echo" / "2")
    (root / "echo" / "config.yaml").write_text(
        "max_batch_size: 64\nversion_policy: {all: true}\n"
        f"dynamic_batching: {{max_queue_delay_us: {delay_us}}}\n{extra}"
    )
    return root


def echo_request(value: float, version: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="echo",
        model_version=version,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="x",
                datatype="FP32",
                shape=[1, 1],
                contents=pb.InferTensorContents(fp32_contents=[value]),
            )
        ],
    )


def echoed(response: pb.ModelInferResponse) -> float:
    return float(np.frombuffer(response.raw_output_contents[0], dtype=np.float32)[0])


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel with its own connection (not shared through grpc's global subchannel pool)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


@asynccontextmanager
async def channels(
    address: str, count: int = CHANNELS, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[list[grpc.aio.Channel]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(channel(address, credentials)) for _ in range(count)]


async def ready(server: ServeProcess) -> str:
    address = await server.address()
    await server.wait_for("ready: serving")
    return address


def metrics_text(server: ServeProcess) -> str:
    url = re.search(METRICS_URL, server.log)
    assert url is not None, server.log
    with urllib.request.urlopen(url.group(1), timeout=10) as reply:
        return str(reply.read().decode())


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in the metrics"
    return float(found.group(1))


async def until(condition: object, limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_every_kind_of_call_goes_through_the_transports_unchanged(tmp_path: Path) -> None:
    repository = echo_repository(tmp_path / "models")
    shutil.copytree(EXAMPLE_REPOSITORY / "tiny_llama", repository / "tiny_llama")
    async with serve_process("--model-repository", repository, *WORKERS) as server:
        address = await ready(server)
        # Both transports listen on the port the log names.
        served = re.findall(r"transport (\d) serving 127\.0\.0\.1:(\d+)", server.log)
        await server.wait_for(r"transport 1 serving")
        served = re.findall(r"transport (\d) serving 127\.0\.0\.1:(\d+)", server.log)
        assert sorted(served) == [("0", address.rsplit(":")[1]), ("1", address.rsplit(":")[1])]
        assert "engine listening on unix:" in server.log
        async with channels(address) as chans:
            # Unary: answers, metadata in (the request id) and trailing metadata out.
            for i, chan in enumerate(chans):
                call = pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(
                    echo_request(float(i)), metadata=((REQUEST_ID_KEY, f"call-{i}"),), timeout=30
                )
                assert echoed(await call) == float(i)
                assert (REQUEST_ID_KEY, f"call-{i}") in tuple(await call.trailing_metadata())
            stub = pb_grpc.GRPCInferenceServiceStub(chans[0])
            # Errors: the engine's code and details, and its trailers.
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "nope" in (missing.value.details() or "")
            assert any(k == REQUEST_ID_KEY for k, _ in missing.value.trailing_metadata() or ())
            # Binary metadata reaches the engine untouched (an invalid request id is replaced).
            bad = echo_request(1.0)
            bad.inputs[0].shape[:] = [1, 2]
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.ModelInfer(bad, metadata=(("x-blob-bin", b"\x00\xff"),), timeout=30)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Server streaming (generation), bidirectional streaming (ModelStreamInfer).
            tokens = [
                r
                async for r in gen_grpc.GenerationServiceStub(chans[1]).Generate(
                    gen.GenerateRequest(
                        model_name="tiny_llama",
                        prompt="hello",
                        parameters=gen.SamplingParameters(max_new_tokens=4, temperature=0.0),
                    ),
                    timeout=60,
                )
            ]
            assert tokens and tokens[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED
            assert 1 <= sum(len(t.token_ids) for t in tokens) <= 4
            stream = stub.ModelStreamInfer(iter([echo_request(5.0), echo_request(6.0)]))
            replies = [r async for r in stream]
            assert [echoed(r.infer_response) for r in replies] == [5.0, 6.0]
            # Health (Check and Watch), reflection, and a method nobody serves.
            health = health_pb2_grpc.HealthStub(chans[2])
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            reflection = reflection_pb2_grpc.ServerReflectionStub(chans[3])
            listed = [
                r
                async for r in reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            names = {s.name for s in listed[0].list_services_response.service}
            assert {"inference.GRPCInferenceService", "sluice.v1.ModelService"} <= names
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await chans[4].unary_unary("/no.Such/Method")(b"", timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # One answer from every connection: statistics and the repository index.
            stats = [
                await pb_grpc.GRPCInferenceServiceStub(c).ModelStatistics(
                    pb.ModelStatisticsRequest(name="echo"), timeout=10
                )
                for c in chans
            ]
            counts = {sum(m.inference_stats.success.count for m in s.model_stats) for s in stats}
            assert counts == {CHANNELS + 2}  # every unary and stream request, once
            indexes = {
                (
                    await pb_grpc.GRPCInferenceServiceStub(c).RepositoryIndex(
                        pb.RepositoryIndexRequest(), timeout=10
                    )
                ).SerializeToString(deterministic=True)
                for c in chans
            }
            assert len(indexes) == 1
        text = metrics_text(server)  # only the engine serves metrics
        assert metric(text, "sluice_transport_processes") == 2
        assert metric(text, "sluice_transport_restarts_total") == 0
        assert metric(text, "sluice_lane_connections") >= 1  # unary calls came by the lane
        assert await server.stop() == 0


async def test_deadline_cancellation_and_pushback_cross_the_transports(tmp_path: Path) -> None:
    repository = echo_repository(tmp_path / "models", delay_us=5_000_000, extra="")
    (repository / "echo" / "config.yaml").write_text(
        "max_batch_size: 64\nversion_policy: {all: true}\n"
        "dynamic_batching: {max_queue_delay_us: 5000000, preferred_batch_sizes: [64]}\n"
    )
    env = {"SLUICE_ADMISSION__MAX_INFLIGHT_REQUESTS": "1", "SLUICE_ADMISSION__PUSHBACK_MS": "70"}
    async with serve_process("--model-repository", repository, *WORKERS, env=env) as server:
        address = await ready(server)
        async with channel(address) as chan, channel(address) as other:
            stub = pb_grpc.GRPCInferenceServiceStub(chan)
            # Waiting 5 s for a batch, a 3 s call ends with DEADLINE_EXCEEDED...
            first = stub.ModelInfer(echo_request(1.0), timeout=3)
            await until(lambda: metric(metrics_text(server), "sluice_inflight_requests") == 1)
            # (meanwhile, over any transport, the engine's overload answer and its pushback)
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await pb_grpc.GRPCInferenceServiceStub(other).ModelInfer(
                    echo_request(9.0), timeout=10
                )
            assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (PUSHBACK_KEY, "70") in tuple(shed.value.trailing_metadata() or ())
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await first
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # ... and a cancelled call leaves the engine's queue: the engine dropped both.
            call = stub.ModelInfer(echo_request(2.0), timeout=30)
            await asyncio.sleep(0.5)
            call.cancel()

            def dropped() -> float:  # the engine saw both callers go (deadline or cancel)
                found = re.findall(
                    r'^sluice_dropped_requests_total{[^}]*reason="(?:deadline|cancelled)"'
                    r"[^}]*} (\S+)$",
                    metrics_text(server),
                    re.MULTILINE,
                )
                return sum(float(value) for value in found)

            await until(lambda: dropped() >= 2)
        assert await server.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_forwarded_identity_cannot_be_forged_over_the_public_port(
    tmp_path: Path, certificates: Certificates, workers: str
) -> None:
    repository = echo_repository(tmp_path / "models")
    env = {
        "SLUICE_TLS__CERT_FILE": str(certificates.server_cert),
        "SLUICE_TLS__KEY_FILE": str(certificates.server_key),
        "SLUICE_TLS__CLIENT_CA_FILE": str(certificates.ca),
        "SLUICE_TLS__REQUIRE_CLIENT_CERT": "true",
        "SLUICE_ADMIN__IDENTITIES": json.dumps([ADMIN_CN]),
        "SLUICE_ADMIN__TOKEN": "the-admin-token",
    }

    def as_(cert: Path, key: Path) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            certificates.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )

    app = as_(certificates.client_cert, certificates.client_key)
    admin = as_(certificates.admin_cert, certificates.admin_key)
    rescan = models.RescanRepositoryRequest()
    args = ("--model-repository", repository, "--workers", workers)
    async with serve_process(*args, env=env) as server:
        address = await ready(server)
        async with channels(address, 4, app) as apps, channel(address, admin) as admins:
            for chan in apps:  # a forged identity, over every transport
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await models_grpc.ModelServiceStub(chan).RescanRepository(
                        rescan,
                        metadata=((IDENTITY_KEY, ADMIN_CN), (PEER_KEY, "unix:")),
                        timeout=30,
                    )
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The admin's certificate is honoured through the transport, as is the token.
            await models_grpc.ModelServiceStub(admins).RescanRepository(rescan, timeout=30)
            await models_grpc.ModelServiceStub(apps[0]).RescanRepository(
                rescan, metadata=(("authorization", "Bearer the-admin-token"),), timeout=30
            )
            history = await models_grpc.ModelServiceStub(admins).GetModelHistory(
                models.GetModelHistoryRequest(model_name="echo"), timeout=30
            )
            assert history is not None
        assert await server.stop() == 0


async def test_lifecycle_changes_under_load_reach_every_transport_with_no_failed_call(
    tmp_path: Path,
) -> None:
    repository = echo_repository(
        tmp_path / "models", delay_us=200, extra="shadow: {model: shadow, fraction: 1.0}\n"
    )
    write_identity(repository, "shadow")
    async with serve_process("--model-repository", repository, *WORKERS) as server:
        address = await ready(server)
        failures: list[str] = []
        versions: list[list[str]] = [[] for _ in range(CHANNELS)]
        stop = asyncio.Event()

        async def load(chan: grpc.aio.Channel, seen: list[str]) -> None:
            stub = pb_grpc.GRPCInferenceServiceStub(chan)
            while not stop.is_set():
                try:
                    reply = await stub.ModelInfer(echo_request(3.0), timeout=30)
                    seen.append(reply.model_version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        async with channels(address) as chans:
            admin = models_grpc.ModelServiceStub(chans[0])
            workers = [
                asyncio.create_task(load(c, seen)) for c, seen in zip(chans, versions, strict=True)
            ]
            try:
                await until(lambda: all(len(v) >= 3 for v in versions))
                steps = (
                    lambda: admin.PromoteModel(
                        models.PromoteModelRequest(model_name="echo", version="1")
                    ),
                    lambda: admin.RollbackModel(models.RollbackModelRequest(model_name="echo")),
                    lambda: admin.PromoteModel(
                        models.PromoteModelRequest(model_name="echo", version="1")
                    ),
                    lambda: admin.UnloadModel(
                        models.UnloadModelRequest(model_name="echo", version="2")
                    ),
                    lambda: admin.LoadModel(
                        models.LoadModelRequest(model_name="echo", version="2")
                    ),
                )
                for step in steps:  # one at a time, each under load
                    await step()
                    await more_calls(versions)
                await more_calls(versions)
                # The shadow switch: off for every transport at once, then on again.
                assert await shadow_mirrored(chans[0]) > 0
                await admin.SetShadowing(models.SetShadowingRequest(enabled=False))
                await more_calls(versions)  # mirrors already started finish
                off = {await shadow_mirrored(c) for c in chans}
                await more_calls(versions)
                assert {await shadow_mirrored(c) for c in chans} == off  # one, unchanged
                await admin.SetShadowing(models.SetShadowingRequest(enabled=True))
                await more_calls(versions)
                assert await shadow_mirrored(chans[-1]) > off.pop()
            finally:
                stop.set()
                await asyncio.gather(*workers)
        assert failures == []
        # After the last promotion every connection, whichever transport it is on, gets 1.
        assert {v[-1] for v in versions} == {"1"}
        assert all("2" in v for v in versions)  # and each saw version 2 before
        assert await server.stop() == 0


async def shadow_mirrored(chan: grpc.aio.Channel) -> int:
    report = await models_grpc.ModelServiceStub(chan).GetShadowReport(
        models.GetShadowReportRequest(model_name="echo"), timeout=10
    )
    return sum(r.mirrored for r in report.reports)


async def more_calls(versions: list[list[str]], count: int = 3) -> None:
    """Until every connection has made ``count`` more calls."""
    marks = [len(v) for v in versions]
    await until(lambda: all(len(v) >= m + count for v, m in zip(versions, marks, strict=True)))


async def test_sigterm_drains_through_every_transport_and_exits_0(tmp_path: Path) -> None:
    repository = echo_repository(tmp_path / "models")
    (repository / "echo" / "config.yaml").write_text(
        "max_batch_size: 64\n"
        "dynamic_batching: {max_queue_delay_us: 2000000, preferred_batch_sizes: [64]}\n"
    )
    env = {"SLUICE_DRAIN_NOTICE_S": "1.0", "SLUICE_DRAIN_GRACE_S": "20"}
    async with serve_process("--model-repository", repository, *WORKERS, env=env) as server:
        address = await ready(server)
        transports = children(server.proc.pid)
        assert len(transports) == 2
        async with channels(address, 4) as chans:
            watches = [
                health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest()) for c in chans
            ]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            # Calls in flight (each waits 2 s for its batch) when the signal lands.
            inflight = [
                pb_grpc.GRPCInferenceServiceStub(c).ModelInfer(echo_request(7.0), timeout=30)
                for c in chans
            ]
            await asyncio.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            for watch in watches:  # NOT_SERVING through every transport, then the end
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.wait_for("draining")
            await asyncio.sleep(1.2)  # past the notice: new calls are refused
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(chans[0]).ModelInfer(
                    echo_request(8.0), timeout=30
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert [echoed(await call) for call in inflight] == [7.0] * 4
            for watch in watches:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await watch.read()
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await server.finish() == 0
        assert server.log.index("draining") < server.log.index("transport processes exited")
        assert not any(alive(pid) for pid in transports)


def test_transports_start_with_malloc_settings_that_hand_large_buffers_back() -> None:
    ours = "glibc.malloc.mmap_threshold=4194304"
    assert transport_environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "MALLOC_ARENA_MAX": "2",
        "GLIBC_TUNABLES": ours,
    }
    operators = {"MALLOC_ARENA_MAX": "8", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    assert transport_environment(operators) == operators
    others = transport_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert others["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{ours}"


async def test_event_loop_asyncio_runs_the_engine_and_every_transport_on_asyncios_loop(
    tmp_path: Path,
) -> None:
    repository = echo_repository(tmp_path / "models")
    env = {"SLUICE_EVENT_LOOP": "asyncio"}
    async with serve_process("--model-repository", repository, *WORKERS, env=env) as server:
        address = await ready(server)
        await server.wait_for("event loop: asyncio")
        for index in (0, 1):
            await server.wait_for(rf"transport {index} serving \S+ \(asyncio\)")
        async with channels(address) as chans:
            replies = await asyncio.gather(
                *(
                    pb_grpc.GRPCInferenceServiceStub(c).ModelInfer(echo_request(2.0), timeout=30)
                    for c in chans
                )
            )
        assert [echoed(r) for r in replies] == [2.0] * CHANNELS


async def test_a_dead_transport_is_restarted_and_none_outlives_a_killed_server(
    tmp_path: Path,
) -> None:
    repository = echo_repository(tmp_path / "models")
    env = {"MALLOC_ARENA_MAX": "3"}  # the operator's choice, which the transports keep
    async with serve_process("--model-repository", repository, *WORKERS, env=env) as server:
        address = await ready(server)
        await server.wait_for("event loop: uvloop")  # the default, in every process
        for index in (0, 1):
            await server.wait_for(rf"transport {index} serving \S+ \(uvloop\)")
        first, second = children(server.proc.pid)
        for pid in (first, second):  # stdout, once the port is told, is the log
            assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2")
        # Large requests the transports had written to shared memory, never read.
        left = shm.SHM_DIR / f"sluice-lane-{first}-{'a' * 32}"
        kept = shm.SHM_DIR / f"sluice-lane-{second}-{'b' * 32}"
        left.write_bytes(b"x" * 4096)
        kept.write_bytes(b"x" * 4096)
        os.kill(first, signal.SIGKILL)
        await server.wait_for(r"transport process 0 exited with status -9; starting it again")
        await server.wait_for("transport process 0 serves again")
        assert not left.exists()  # the dead transport's: removed by the engine
        assert kept.exists()  # a running transport's: its own
        kept.unlink()
        now = children(server.proc.pid)
        assert len(now) == 2 and second in now and first not in now
        for pid in now:  # the restarted one too: glibc's malloc hands large buffers back
            started_with = environment(pid)
            assert started_with["MALLOC_ARENA_MAX"] == "3"
            assert started_with["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=4194304"
        async with channels(address) as chans:
            replies = await asyncio.gather(
                *(
                    pb_grpc.GRPCInferenceServiceStub(c).ModelInfer(echo_request(1.0), timeout=30)
                    for c in chans
                )
            )
        assert [echoed(r) for r in replies] == [1.0] * CHANNELS
        text = metrics_text(server)
        assert metric(text, "sluice_transport_restarts_total") == 1
        assert metric(text, "sluice_transport_processes") == 2
        # Each transport's memory and CPU, the restarted one's from its new process.
        restarted = next(pid for pid in now if pid != second)
        for index, pid in (("0", restarted), ("1", second)):
            resident = metric(text, f'sluice_transport_resident_bytes{{transport="{index}"}}')
            rss = status_bytes("VmRSS", pid)
            assert abs(resident - rss) < 0.2 * rss, (index, resident, rss)
            cpu = metric(text, f'sluice_transport_cpu_seconds_total{{transport="{index}"}}')
            assert 0 < cpu <= cpu_seconds(pid), (index, cpu)
        server.proc.kill()  # the engine dies without a drain: its transports die with it
        await server.proc.wait()
        await until(lambda: not any(alive(pid) for pid in now), limit_s=10)


async def test_requests_from_different_transports_join_one_batch_in_one_trace_each(
    tmp_path: Path,
) -> None:
    collector = await Collector().start()
    repository = echo_repository(tmp_path / "models", delay_us=300_000)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "sluice-workers-test",
    }
    try:
        async with serve_process("--model-repository", repository, *WORKERS, env=env) as server:
            address = await ready(server)
            async with channels(address) as chans:
                for round_ in range(3):  # each connection has one call at a time
                    calls = [
                        pb_grpc.GRPCInferenceServiceStub(c).ModelInfer(
                            echo_request(float(i)),
                            metadata=(("traceparent", traceparent(round_, i)),),
                            timeout=20,
                        )
                        for i, c in enumerate(chans)
                    ]
                    assert [echoed(await c) for c in calls] == [float(i) for i in range(CHANNELS)]
                stats = await pb_grpc.GRPCInferenceServiceStub(chans[0]).ModelStatistics(
                    pb.ModelStatisticsRequest(name="echo"), timeout=10
                )
            inferences = sum(m.inference_count for m in stats.model_stats)
            executions = sum(m.execution_count for m in stats.model_stats)
            assert inferences == 3 * CHANNELS
            assert executions < inferences  # batches larger than any connection's one call
            assert await server.stop() == 0
        spans = await collector.wait_for(
            lambda got: (
                len([s for s in got if s.name.startswith("sluice.transport/")]) >= 3 * CHANNELS
            )
        )
    finally:
        await collector.stop()
    by_id = {s.span_id: s for s in spans}
    infer = "inference.GRPCInferenceService/ModelInfer"
    transport_spans = [s for s in spans if s.name == f"sluice.transport/{infer}"]
    # One trace per call: the caller's trace id, the transport's span under the caller's,
    # the engine's server span under the transport's.
    callers = {
        traceparent(r, i).split("-")[1]: traceparent(r, i).split("-")[2]
        for r in range(3)
        for i in range(CHANNELS)
    }
    for span in transport_spans:
        assert span.parent_span_id == callers[span.trace_id]
        engine = [s for s in spans if s.name == infer and s.parent_span_id == span.span_id]
        assert len(engine) == 1 and engine[0].trace_id == span.trace_id
        assert engine[0].attributes["sluice.budget_s"] < 25  # the caller's 20 s, not 30
    assert {s.trace_id for s in transport_spans} == set(callers)

    def transport_of(span_id: str) -> int | None:
        span = by_id.get(span_id)
        while span is not None:
            if "sluice.transport" in span.attributes:
                return int(span.attributes["sluice.transport"])
            span = by_id.get(span.parent_span_id)
        return None

    mixes = [
        {transport_of(span_id) for _, span_id in batch.links}
        for batch in spans
        if batch.name == "sluice.batch"
    ]
    assert {0, 1} in [m - {None} for m in mixes], mixes  # a batch with calls from both


def traceparent(round_: int, index: int) -> str:
    return f"00-{round_ + 1:016x}{index + 1:016x}-{index + 1:016x}-01"


def test_a_transport_strips_the_callers_internal_keys_and_adds_the_identity() -> None:
    forwarded = outgoing(
        [
            ("x-request-id", "r1"),
            (IDENTITY_KEY, ADMIN_CN),
            (PEER_KEY, "unix:"),
            (TRANSPORT_KEY, "7"),
            ("user-agent", "grpc-python"),
            ("x-blob-bin", b"\x00"),
            ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
        ],
        peer="ipv4:10.0.0.9:5555",
        names=["app", "spiffe://sluice.test/app"],
        transport=1,
    )
    assert forwarded == [
        ("x-request-id", "r1"),
        ("x-blob-bin", b"\x00"),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
        (PEER_KEY, "ipv4:10.0.0.9:5555"),
        (IDENTITY_KEY, "app"),
        (IDENTITY_KEY, "spiffe://sluice.test/app"),
        (TRANSPORT_KEY, "1"),
    ]
    # The engine takes the names only from its private socket.
    assert forwarded_names("unix:", forwarded) == ["app", "spiffe://sluice.test/app"]
    assert forwarded_names("ipv4:127.0.0.1:4444", forwarded) == []


@pytest.mark.parametrize("workers", [0, 65])
def test_workers_is_between_1_and_64(workers: int) -> None:
    with pytest.raises(ValidationError, match="workers"):
        load_settings(workers=workers)
    assert load_settings().workers is None  # chosen from the machine at start (test_machine)
    assert load_settings(workers=64).workers == 64


async def test_a_busy_port_is_a_clear_error_and_exit_1(tmp_path: Path) -> None:
    repository = echo_repository(tmp_path / "models")
    with socket.socket() as busy:  # held the ordinary way: no SO_REUSEPORT
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ("--model-repository", repository, *WORKERS, "--grpc-port", str(port))
        async with serve_process(*args) as server:  # the last --grpc-port wins
            status = await server.finish(60)
    assert status == 1, server.log
    assert f"cannot listen on 127.0.0.1 (grpc_port {port}" in server.log
    assert f"transport process 0 did not start listening on 127.0.0.1:{port}" in server.log
    assert "Traceback" not in server.log


async def test_a_second_server_on_the_same_port_is_refused_not_let_share_it(
    tmp_path: Path,
) -> None:
    """Transports bind with SO_REUSEPORT, which would let a second server of the same user
    start on the port and take some of the first one's connections: it is refused at start,
    naming the first, and the first serves on."""
    repository = echo_repository(tmp_path / "models")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ("--model-repository", repository, *WORKERS, "--grpc-port", str(port))
    async with serve_process(*args) as first:
        await first.wait_for("ready: serving")
        async with serve_process(*args) as second:
            status = await second.finish(60)
        assert status == 1, second.log
        taken = f"port {port} is served by another sluice serve on this machine (pid "
        assert taken + f"{first.proc.pid};" in second.log, second.log
        assert "Traceback" not in second.log
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        assert await first.stop() == 0
    # Once the first has stopped, the port is free for the next one.
    async with serve_process(*args) as third:
        await third.wait_for("ready: serving")
        assert await third.stop() == 0


class _GatedLoads(FakeFactory):
    """The fake backend, whose loads wait (in their thread) while ``closed`` is set."""

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(behaviour)
        self.closed = threading.Event()
        self.opened = threading.Event()
        self.waiting = threading.Event()

    def load(self, path: Path, options: LoadOptions) -> Executor:
        if self.closed.is_set():
            self.waiting.set()
            self.opened.wait(60)
        return super().load(path, options)


async def test_a_drain_lets_a_slow_admin_call_through_a_transport_finish(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A LoadModel (not admitted, so not what the drain's quiet wait counts) still running
    # when the drain starts gets the drain's grace through a transport, as it does over
    # the engine's own port: the transport is not killed a moment after the engine's port
    # has closed.
    factory = _GatedLoads(Behaviour())
    running = await start_server(
        repository=fake_repository(tmp_path / "models"), backends=BackendRegistry([factory])
    )
    engine = EngineSocket.create()
    assert running.server.methods is not None
    lane = LaneServer(running.server.methods, max_message_bytes=running.settings.max_message_bytes)
    await lane.start(engine.lane)
    transports = Transports(running.settings, engine, running.metrics, lane=lane)
    try:
        port = await transports.start()
        running.server.front = transports
        async with channel(f"127.0.0.1:{port}") as chan:
            stub = models_grpc.ModelServiceStub(chan)
            await stub.UnloadModel(models.UnloadModelRequest(model_name="fake"), timeout=30)
            factory.closed.set()
            loading = stub.LoadModel(models.LoadModelRequest(model_name="fake"), timeout=60)
            await asyncio.to_thread(factory.waiting.wait, 30)
            drain = asyncio.create_task(running.server.drain(grace_s=30, quiet_s=0))
            await asyncio.sleep(2.0)  # past the drain's closing allowance (1 s)
            factory.opened.set()
            await loading
            await drain
    finally:
        factory.opened.set()
        await transports.wait_stopped(5)
        engine.remove()


async def test_a_transport_that_cannot_be_started_again_is_retried_and_the_stop_still_ends(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The interpreter the transports run in is gone (a deploy replaced the environment):
    # restarting a transport that exited fails with OSError, which must neither end its
    # supervision silently nor surface from the stop.
    running = await start_server()
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    engine = EngineSocket.create()
    transports = Transports(running.settings, engine, running.metrics, python=str(python))
    try:
        await transports.start()
        python.unlink()
        os.kill(transports._procs[0].pid, signal.SIGKILL)
        restarts = "sluice_transport_restarts_total"
        await until(lambda: running.metrics.registry.get_sample_value(restarts) == 1)
        await asyncio.sleep(0.5)  # past the first restart's delay: its start fails
        assert all(not task.done() for task in transports._supervisors)
    finally:
        await transports.wait_stopped(5)
        engine.remove()


async def test_a_restart_that_fails_in_an_unexpected_way_is_retried_not_given_up(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever goes wrong while starting a transport again (not only a failed start or an
    # interpreter that cannot be run: here, reading its first line fails), its supervisor
    # logs it and tries again: the transport comes back instead of the server serving on
    # fewer processes from then on, and the process of the failed try is ended, not left
    # running untracked.
    running = await start_server()
    engine = EngineSocket.create()
    transports = Transports(running.settings, engine, running.metrics)
    monkeypatch.setattr(topology, "RESTART_DELAYS_S", (0.1, 0.2))
    real_start = Child.start
    broken: list[Child] = []

    async def start_and_fail_reading_once(argv: list[str], env: dict[str, str]) -> Child:
        child = await real_start(argv, env)
        if not broken:
            broken.append(child)

            async def readline() -> bytes:
                raise ValueError("Separator is found, but chunk is longer than limit")

            monkeypatch.setattr(child.stdout, "readline", readline)
        return child

    try:
        await transports.start()
        first = transports._procs[0].pid
        monkeypatch.setattr(Child, "start", start_and_fail_reading_once)
        os.kill(first, signal.SIGKILL)
        await until(
            lambda: (
                len(transports._running()) == transports.count
                and first not in transports._running().values()
            ),
            limit_s=30,
        )
        assert len(broken) == 1
        async with asyncio.timeout(10):
            assert await broken[0].wait() == -signal.SIGKILL
        assert broken[0].pid not in transports._running().values()
        assert all(not task.done() for task in transports._supervisors)
    finally:
        for child in broken:
            child.kill()
        await transports.wait_stopped(5)
        engine.remove()
