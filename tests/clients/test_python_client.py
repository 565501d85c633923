"""sluice_client's generation, token counting and sluice.v1 model calls against a real
server (tests/test_client.py covers inference, health and errors), and the package on its own.

The blocking client runs in a worker thread, so the server on the test's event loop serves.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from sluice_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    GenerateChunk,
    GenerateResult,
    NotFound,
)
from tests.clients.conftest import GENERATION_PROMPT, served_generation_model
from tests.compat.procs import run
from tests.conftest import REPO_ROOT, RunningServer

PROMPT = GENERATION_PROMPT


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address) as opened:
        yield opened


@pytest.fixture
async def model(server: RunningServer) -> str:
    name = await served_generation_model(server.address)
    if not name:
        pytest.skip("the server serves no generation model")
    return name


async def test_list_models_shows_backend_and_breaker(client: AsyncClient) -> None:
    simple = next(m for m in await client.list_models() if m.name == "simple")
    assert (simple.version, simple.state, simple.breaker_state) == ("1", "READY", "CLOSED")
    assert simple.backend and simple.device


async def test_streamed_chunks_join_into_the_whole_generation(
    client: AsyncClient, server: RunningServer, model: str
) -> None:
    chunks = [c async for c in client.generate(model, PROMPT, max_new_tokens=8)]
    assert len(chunks) >= 2
    *body, last = chunks
    assert all(c.finish_reason is None and c.usage is None for c in body)
    assert last.finish_reason in ("length", "stop") and last.usage is not None
    tokens = [t for c in chunks for t in c.token_ids]
    assert last.usage.completion_tokens == len(tokens) <= 8
    assert {(c.model, c.version) for c in chunks} == {(model, "1")}
    streamed = "".join(c.text for c in chunks)
    whole = await client.generate_text(model, PROMPT, max_new_tokens=8)
    assert (whole.text, whole.token_ids) == (streamed, tokens)
    with Client(server.address) as blocking:
        sync_chunks = await asyncio.to_thread(
            lambda: list(blocking.generate(model, PROMPT, max_new_tokens=8))
        )
    assert GenerateResult.join(sync_chunks) == GenerateResult.join(chunks)
    count = await client.count_tokens(model, PROMPT)
    assert count.token_count == last.usage.prompt_tokens
    assert count.max_context > count.token_count


async def _long_generation(client: AsyncClient, model: str) -> AsyncGenerator[GenerateChunk, None]:
    count = await client.count_tokens(model, PROMPT)
    return client.generate(model, PROMPT, max_new_tokens=count.max_context - count.token_count)


async def test_leaving_the_stream_cancels_it(client: AsyncClient, model: str) -> None:
    stream = await _long_generation(client, model)
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()  # what leaving an `async for` early does
    again = await client.generate_text(model, PROMPT, max_new_tokens=2)
    assert again.usage is not None and again.usage.completion_tokens == 2


async def test_cancelling_the_task_cancels_the_stream(client: AsyncClient, model: str) -> None:
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in await _long_generation(client, model):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await first_chunk.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_generation_deadline_and_unknown_model(
    client: AsyncClient, server: RunningServer, model: str
) -> None:
    count = await client.count_tokens(model, PROMPT)
    longest = count.max_context - count.token_count
    with pytest.raises(DeadlineExceeded):
        await client.generate_text(model, PROMPT, max_new_tokens=longest, timeout_s=0.02)
    with pytest.raises(NotFound):
        await client.generate_text("nope", PROMPT)
    with Client(server.address, timeout_s=0.02) as blocking, pytest.raises(DeadlineExceeded):
        await asyncio.to_thread(blocking.generate_text, model, PROMPT, max_new_tokens=longest)


# The client package alone: no server code, no server dependencies.
ALONE = textwrap.dedent(
    """\
    import importlib.abc, sys

    SERVER_ONLY = {
        "sluice", "onnxruntime", "pydantic", "pydantic_settings", "yaml", "torch", "pybreaker",
        "grpc_health", "grpc_reflection", "grpc_status", "prometheus_client",
    }

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in SERVER_ONLY:
                raise ImportError(f"the client imported {name}")
            return None

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from sluice_client import Client

    with Client(sys.argv[2]) as client:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        out = client.infer("simple", {"INPUT0": a, "INPUT1": a}).outputs["OUTPUT0"]
        print(client.health(), out.sum(), [m.name for m in client.list_models()][:1])
    """
)


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/python built as a wheel (before any server starts)."""
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(out), str(REPO_ROOT / "clients" / "python")], check=True)
    (wheel,) = out.glob("sluice_client-*.whl")
    return wheel


def test_the_wheel_carries_every_stub_and_needs_three_packages(client_wheel: Path) -> None:
    archive = zipfile.ZipFile(client_wheel)
    names = set(archive.namelist())
    assert "sluice_api/sluice/v1/generation_service_pb2.py" in names
    assert "sluice_api/inference/grpc_service_pb2.pyi" in names
    assert "sluice_client/py.typed" in names
    metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: ([\w-]+)", metadata, re.MULTILINE)
    assert sorted(requires) == ["grpcio", "numpy", "protobuf"]


async def test_the_client_works_without_the_server_package(
    client_wheel: Path, server: RunningServer, tmp_path: Path
) -> None:
    script = tmp_path / "alone.py"
    script.write_text(ALONE)
    done = await run(sys.executable, "-I", script, client_wheel, server.address)
    assert done.check().stdout.split()[:2] == ["SERVING", "240"], done.describe()
