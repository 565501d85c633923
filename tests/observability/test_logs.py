"""Structured logs and request ids, seen from outside: JSON lines written while real calls
run, the ids a client gets back, and what must never reach a log."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice import logs
from sluice.settings import load_settings
from sluice.tracing import Tracing
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import StartServer
from tests.observability.collector import Collector
from tests.serve_process import workers_env
from tests.test_routing import simple_request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRET = "Bearer s3cr3t-token-value"
PAYLOAD_VALUE = 987654321


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record of every logger at DEBUG, formatted as ``sluice serve`` formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_an_attempt_log_line_carries_request_and_trace_ids_and_the_model(
    start_server: StartServer, tracing: Tracing, collector: Collector, captured: io.StringIO
) -> None:
    server = await start_server(tracing=tracing)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            simple_request("simple"),
            metadata=(("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),),
        )
        await call
        request_id = dict(await call.trailing_metadata() or ())["x-request-id"]
    assert await tracing.flush()
    spans = await collector.wait_for(lambda got: any(s.name == "sluice.attempt" for s in got))
    (attempt,) = [s for s in spans if s.name == "sluice.attempt"]

    (line,) = [e for e in lines(captured) if e.get("request_id") == request_id]
    assert line["level"] == "DEBUG"
    assert str(line["timestamp"]).endswith("+00:00")
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == attempt.span_id
    assert (line["model"], line["version"], line["backend"]) == ("simple", "1", "onnxruntime")
    assert line["outcome"] == "ok"
    assert line["attempt"] == 1


async def test_the_request_id_is_in_the_trailers_and_every_error_message(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ok = stub.ModelInfer(simple_request("simple"))
        await ok
        assert dict(await ok.trailing_metadata() or ())["x-request-id"]

        mine = stub.ModelInfer(simple_request("simple"), metadata=(("x-request-id", "abc-123"),))
        await mine
        assert dict(await mine.trailing_metadata() or ())["x-request-id"] == "abc-123"

        for request in (simple_request("nope"), simple_request("simple", datatype="FP32")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request)
            rid = dict(caught.value.trailing_metadata() or ())["x-request-id"]
            assert f"(request id {rid})" in str(caught.value.details())

        stream = stub.ModelStreamInfer(iter([simple_request("nope")]))
        (response,) = [r async for r in stream]
        rid = dict(await stream.trailing_metadata() or ())["x-request-id"]
        assert f"(request id {rid})" in response.error_message


async def test_no_credential_or_payload_ever_reaches_a_log(
    start_server: StartServer, captured: io.StringIO
) -> None:
    server = await start_server(admission={"tenant_max_inflight_requests": 5})
    payload = np.full((1, 16), PAYLOAD_VALUE, dtype=np.int32)
    request = simple_request("simple")
    request.raw_input_contents[:] = [payload.tobytes(), payload.tobytes()]
    bad = simple_request("simple")
    bad.raw_input_contents[:] = [payload.tobytes()[:-4], payload.tobytes()]  # short: invalid
    metadata = (("authorization", SECRET), ("x-sluice-tenant", "acme"))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(bad, metadata=metadata)
        [r async for r in stub.ModelStreamInfer(iter([request, bad]), metadata=metadata)]
    text = captured.getvalue()
    assert text  # the calls did log
    assert "s3cr3t" not in text
    assert str(PAYLOAD_VALUE) not in text
    assert payload.tobytes()[:8].hex() not in text


def test_a_record_is_one_json_line_even_with_a_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("sluice.test.oneline")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError("first line\nsecond line")
        except RuntimeError:
            logger.error("failed", exc_info=True, extra=logs.fields(model="m", outcome="error"))
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "failed"
    assert (entry["model"], entry["outcome"]) == ("m", "error")
    assert "second line" in entry["exception"]
    assert "request_id" not in entry  # outside any call


def test_only_known_fields_can_be_added_to_a_record() -> None:
    with pytest.raises(ValueError, match="payload"):
        logs.fields(model="m", payload="x")


def test_format_and_level_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LOG_FORMAT", "text")
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "warning")
    settings = load_settings()
    assert (settings.log_format, settings.log_level) == ("text", "warning")
    assert load_settings(log_format="json").log_format == "json"
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        logs.configure(settings.log_level, settings.log_format)
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[-1].formatter, logs.TextFormatter)
        logs.configure("debug", "json")
        assert root.level == logging.DEBUG
        assert isinstance(root.handlers[-1].formatter, logs.JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[1]:
            root.addHandler(handler)
        root.setLevel(saved[0])


# -- text for a person, JSON for a collector -------------------------------------------------


def read_terminal(fd: int, limit_s: float) -> bytes:
    """Everything written to a pseudo-terminal until its last writer closes it."""
    chunks = []
    while select.select([fd], [], [], limit_s)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def serve_log(repository: Path, *, terminal: bool, log_format: str | None) -> list[str]:
    """The log lines of a real ``sluice serve`` with nothing to serve (it exits by itself),
    its stderr a pseudo-terminal or a pipe."""
    env = {k: v for k, v in {**os.environ, **workers_env()}.items() if k != "SLUICE_LOG_FORMAT"}
    if log_format is not None:
        env["SLUICE_LOG_FORMAT"] = log_format
    command = [sys.executable, "-m", "sluice", "serve", "--model-repository", str(repository)]
    command += ["--grpc-port", "0", "--metrics-port", "0"]
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        return done.stderr.splitlines()
    main, child = pty.openpty()
    try:
        with subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child
        ) as proc:
            os.close(child)
            output = read_terminal(main, limit_s=120)
            assert proc.wait(120) == 1, output
    finally:
        os.close(main)
    return output.decode().splitlines()


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("terminal", "log_format", "expected"),
    [
        (True, None, "text"),
        (False, None, "json"),
        (True, "json", "json"),
        (False, "text", "text"),
    ],
    ids=["terminal", "pipe", "terminal-json", "pipe-text"],
)
def test_logs_are_text_on_a_terminal_and_json_elsewhere(
    tmp_path: Path, terminal: bool, log_format: str | None, expected: str
) -> None:
    lines = serve_log(tmp_path, terminal=terminal, log_format=log_format)
    assert len(lines) >= 3, lines
    if expected == "json":
        assert all(is_json(line) for line in lines), lines
        assert any(json.loads(line)["message"].startswith("nothing to serve") for line in lines)
    else:
        assert not any(is_json(line) for line in lines), lines
        assert any(" ERROR sluice.app: nothing to serve: " in line for line in lines), lines
