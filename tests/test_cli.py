"""The ``sluice`` client commands, run as subprocesses against the in-process server.

``asyncio.create_subprocess_exec`` keeps the test's event loop (and so the server) running
while a command waits for its answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sluice_client import AsyncClient
from tests.conftest import RunningServer, StartServer


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def sluice(*args: str, env: dict[str, str] | None = None) -> Finished:
    base = {k: v for k, v in os.environ.items() if k != "SLUICE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


def assert_clean_failure(finished: Finished, *expected: str) -> None:
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    for text in expected:
        assert text in finished.stderr


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address that refuses connections: a bound port that never listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_health_of_the_server_and_a_model(server: RunningServer) -> None:
    overall = await sluice("health", "--url", server.address)
    assert (overall.returncode, overall.stdout) == (0, "SERVING\n")
    model = await sluice("health", "--url", server.address, "--model", "mlp")
    assert (model.returncode, model.stdout) == (0, "SERVING\n")


async def test_health_of_an_unknown_model_fails_cleanly(server: RunningServer) -> None:
    finished = await sluice("health", "--url", server.address, "--model", "nope")
    assert_clean_failure(finished, "NOT_FOUND", "sluice.model.nope")


async def test_health_not_serving_exits_non_zero(server: RunningServer) -> None:
    await server.server.health.enter_graceful_shutdown()
    finished = await sluice("health", "--url", server.address)
    assert (finished.returncode, finished.stdout) == (1, "NOT_SERVING\n")


async def test_models_prints_a_table_using_sluice_url(server: RunningServer) -> None:
    finished = await sluice("models", env={"SLUICE_URL": server.address})
    assert finished.returncode == 0
    lines = [line.split() for line in finished.stdout.splitlines()]
    assert lines == [
        ["NAME", "VERSION", "STATE", "REASON"],
        ["mlp", "2", "READY"],
        ["passthrough", "1", "READY"],
        ["simple", "1", "READY"],
        ["tiny_llama", "1", "READY"],
    ]


async def test_infer_prints_and_saves_outputs(server: RunningServer, tmp_path: Path) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, np.int32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    finished = await sluice(
        "infer",
        "simple",
        "--url",
        server.address,
        "--version",
        "1",
        "--input",
        f"INPUT0={tmp_path / 'a.npy'}",
        "--input",
        f"INPUT1={tmp_path / 'b.npy'}",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert finished.returncode == 0, finished.stderr
    assert "model simple version 1" in finished.stdout
    assert "OUTPUT0  INT32  [2, 16]" in finished.stdout
    assert "OUTPUT1  INT32  [2, 16]" in finished.stdout
    assert "..." in finished.stdout  # 32 values are truncated
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "OUTPUT0.npy"), a + b)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "OUTPUT1.npy"), a - b)


async def test_infer_saves_bytes_outputs_without_pickle(
    server: RunningServer, tmp_path: Path
) -> None:
    dtypes = {
        "BOOL": "bool",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
        "BYTES": "S5",
    }
    args = []
    for name, dtype in dtypes.items():
        value = np.array([[b"hello", b"ok"]]) if name == "BYTES" else np.ones((1, 2), dtype)
        np.save(tmp_path / f"{name}.npy", value)
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    finished = await sluice(
        "infer", "passthrough", "--url", server.address, *args, "--output-dir", str(tmp_path)
    )
    assert finished.returncode == 0, finished.stderr
    assert "BYTES_OUT  BYTES  [1, 2]" in finished.stdout
    saved = np.load(tmp_path / "BYTES_OUT.npy", allow_pickle=False)
    assert saved.tolist() == [[b"hello", b"ok"]]


async def test_infer_with_a_wrong_datatype_fails_cleanly(
    server: RunningServer, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float64))
    finished = await sluice(
        "infer", "mlp", "--url", server.address, "--input", f"input={tmp_path / 'x.npy'}"
    )
    assert_clean_failure(finished, "INVALID_ARGUMENT", "FP64", "request id")
    assert finished.stdout == ""


async def test_infer_with_a_missing_file_fails_cleanly(
    server: RunningServer, tmp_path: Path
) -> None:
    finished = await sluice(
        "infer", "mlp", "--url", server.address, "--input", f"input={tmp_path / 'no.npy'}"
    )
    assert_clean_failure(finished, "no.npy")


async def test_infer_rejects_a_malformed_input_argument() -> None:
    finished = await sluice("infer", "mlp", "--input", "just-a-file.npy")
    assert finished.returncode == 2
    assert "NAME=FILE.npy" in finished.stderr


async def test_unreachable_server_fails_cleanly(refused_address: str) -> None:
    finished = await sluice("models", "--url", refused_address, "--timeout-s", "5")
    assert_clean_failure(finished, "UNAVAILABLE")


# -- generate and count-tokens ---------------------------------------------------------------

MODEL = "tiny_llama"
PROMPT = "Once upon a time"


@pytest.fixture
async def generation_server(start_server: StartServer, example_repository: Path) -> RunningServer:
    """The examples, and copies of the language model that hang or fail after 3 tokens."""
    for name, mode in (("hangs", "hang"), ("fails", "fail")):
        copy = example_repository / f"{MODEL}_{name}"
        shutil.copytree(example_repository / MODEL, copy)
        (copy / "config.yaml").write_text(f"faults: {{mode: {mode}, after_tokens: 3}}\n")
    return await start_server(repository=example_repository)


async def expected_text(address: str, **sampling: object) -> str:
    async with AsyncClient(address) as client:
        return (await client.generate_text(MODEL, PROMPT, **sampling)).text


async def test_generate_streams_the_text_as_it_is_made(generation_server: RunningServer) -> None:
    """The first tokens reach stdout while the generation is still running (here: hung
    after its third token); Ctrl-C then ends the command, and the generation with it."""
    first = (await expected_text(generation_server.address, max_new_tokens=3)).encode()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sluice", "generate", f"{MODEL}_hangs", PROMPT),
        *("--url", generation_server.address, "--max-new-tokens", "50"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # As at a terminal: a shell's background jobs (CI's, say) inherit SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readexactly(len(first)), 60) == first
    assert process.returncode is None  # still streaming
    process.send_signal(signal.SIGINT)
    rest, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 130, stderr
    assert rest == b"\n" and b"Traceback" not in stderr


async def test_generate_prints_the_text_and_with_verbose_the_usage(
    generation_server: RunningServer,
) -> None:
    address = generation_server.address
    text = await expected_text(address, max_new_tokens=12)
    finished = await sluice("generate", MODEL, PROMPT, "--url", address, "--max-new-tokens", "12")
    assert (finished.returncode, finished.stdout, finished.stderr) == (0, text + "\n", "")
    verbose = await sluice(
        "generate", MODEL, PROMPT, "--url", address, "--max-new-tokens", "12", "--verbose"
    )
    assert verbose.stdout == text + "\n"
    assert verbose.stderr == (
        f"model={MODEL} version=1 finish_reason=length prompt_tokens=4 completion_tokens=12\n"
    )


async def test_generate_passes_every_sampling_flag(generation_server: RunningServer) -> None:
    address = generation_server.address
    sampling = {"max_new_tokens": 20, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7}
    sampled = await expected_text(address, **sampling)
    flags = [
        arg
        for name, value in sampling.items()
        for arg in (f"--{name.replace('_', '-')}", str(value))
    ]
    finished = await sluice("generate", MODEL, PROMPT, "--url", address, *flags)
    assert (finished.returncode, finished.stdout) == (0, sampled + "\n"), finished.stderr
    # Stop sequences: the text ends before the first one that appears.
    greedy = await expected_text(address, max_new_tokens=20)
    stop = greedy.split()[3]
    stopped = await expected_text(address, max_new_tokens=20, stop_sequences=[stop, "zzz"])
    finished = await sluice(
        "generate",
        MODEL,
        PROMPT,
        "--url",
        address,
        "--max-new-tokens",
        "20",
        "--stop",
        stop,
        "--stop",
        "zzz",
        "--verbose",
    )
    assert finished.stdout == stopped + "\n" and stop not in stopped
    assert "finish_reason=stop" in finished.stderr


async def test_generate_errors_give_the_status_and_exit_1(
    generation_server: RunningServer,
) -> None:
    address = generation_server.address
    unknown = await sluice("generate", "nope", PROMPT, "--url", address)
    assert_clean_failure(unknown, "sluice generate: NOT_FOUND: ", "'nope'", "request id")
    assert unknown.stdout == ""
    too_long = await sluice("generate", MODEL, PROMPT, "--url", address, "--max-new-tokens", "9999")
    assert_clean_failure(too_long, "sluice generate: INVALID_ARGUMENT: ", "context of 256")
    # A failure after the first tokens: what streamed stays on stdout, the status follows.
    first = await expected_text(address, max_new_tokens=3)
    midway = await sluice("generate", f"{MODEL}_fails", PROMPT, "--url", address)
    assert_clean_failure(midway, "sluice generate: UNAVAILABLE: ", "injected fault")
    assert midway.stdout == first + "\n"


async def test_count_tokens(generation_server: RunningServer) -> None:
    async with AsyncClient(generation_server.address) as client:
        count = await client.count_tokens(MODEL, PROMPT)
    finished = await sluice("count-tokens", MODEL, PROMPT, "--url", generation_server.address)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == f"{count.token_count} tokens (the model's context: 256)\n"
    assert count.token_count == 4
    unknown = await sluice("count-tokens", "nope", PROMPT, "--url", generation_server.address)
    assert_clean_failure(unknown, "sluice count-tokens: NOT_FOUND: ")
