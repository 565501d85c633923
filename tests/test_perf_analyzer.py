"""Triton's perf_analyzer (C++ client, ``-i grpc``) against a real Sluice server.

perf_analyzer needs ModelMetadata, ModelConfig, ServerMetadata and (because we advertise
"statistics") ModelStatistics with a numeric version and a growing queue count; any error
status aborts the run. ``scripts/get_perf_analyzer.sh`` provides a runnable binary (cached
under ``.cache/``). Without it (no network) the test skips, or fails where toolchains are
required (``SLUICE_REQUIRE_TOOLCHAINS``, see ``tests/toolchains.py``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import toolchains
from tests.certs import Certificates
from tests.compat.procs import REPO_ROOT, run
from tests.conftest import RunningServer, StartServer

pytestmark = pytest.mark.slow

GETTER = REPO_ROOT / "scripts" / "get_perf_analyzer.sh"


async def perf_analyzer() -> str:
    done = await run("bash", GETTER, limit_s=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("/"):
        return lines[-1]
    toolchains.missing(
        f"needs perf_analyzer, which scripts/get_perf_analyzer.sh could not provide:\n"
        f"{done.describe()}"
    )


@dataclass(frozen=True)
class Counts:
    inference: int
    execution: int
    success: int
    queue: int

    @classmethod
    def of(cls, server: RunningServer, model: str) -> Counts:
        stats = server.service.get(model).stats
        return cls(
            stats.inference_count, stats.execution_count, stats.success.count, stats.queue.count
        )

    def minus(self, before: Counts) -> Counts:
        return Counts(
            self.inference - before.inference,
            self.execution - before.execution,
            self.success - before.success,
            self.queue - before.queue,
        )


async def profile(
    binary: str,
    server: RunningServer,
    tmp_path: Path,
    model: str,
    *,
    concurrency: int,
    requests: int,
    streaming: bool = False,
    input_data: Path | None = None,
    tls: tuple[str, ...] = (),
) -> tuple[dict[str, str], Counts]:
    """One perf_analyzer run of exactly ``requests`` requests (a fixed amount of work
    instead of time windows that must stabilise on a noisy machine). Returns the CSV row
    and how much the server's statistics grew."""
    csv_path = tmp_path / f"{model}-c{concurrency}{'-stream' if streaming else ''}.csv"
    before = Counts.of(server, model)
    done = await run(
        binary,
        *("-i", "grpc", "-u", server.address, "-m", model, "-b", "1"),
        *("--concurrency-range", f"{concurrency}:{concurrency}"),
        *("--request-count", str(requests), "-f", csv_path),
        *(["--streaming"] if streaming else []),
        *(["--input-data", str(input_data)] if input_data else []),
        *tls,
        limit_s=60,
    )
    done.check()
    # It read ModelStatistics (we advertise "statistics") and printed the server side.
    assert "Server:" in done.stdout and "Inference count:" in done.stdout, done.describe()
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1, done.describe()
    row = rows[0]
    assert int(row["Concurrency"]) == concurrency, row
    assert float(row["Inferences/Second"]) > 0, (row, done.describe())
    assert float(row["p50 latency"]) > 0, row
    grew = Counts.of(server, model).minus(before)
    # Every request was served and counted (batch 1: one inference per request).
    assert grew.inference >= requests, grew
    assert grew.success >= requests and grew.queue >= requests, grew
    assert 1 <= grew.execution <= grew.inference, grew
    return row, grew


async def test_perf_analyzer_against_sluice(server: RunningServer, tmp_path: Path) -> None:
    binary = await perf_analyzer()
    # ModelInfer at concurrency 1, 8 and 32.
    for concurrency, requests in ((1, 200), (8, 400), (32, 640)):
        _, grew = await profile(
            binary, server, tmp_path, "simple", concurrency=concurrency, requests=requests
        )
    # Under load the dynamic batcher merged requests: fewer executions than inferences.
    assert grew.execution < grew.inference, grew
    # ModelStreamInfer: one stream per concurrency slot, responses matched by echoed id.
    await profile(binary, server, tmp_path, "simple", concurrency=8, requests=400, streaming=True)
    # A model whose served version is "2" (perf_analyzer std::stoll()s the version and
    # picks the statistics entry whose queue count grew).
    await profile(binary, server, tmp_path, "mlp", concurrency=4, requests=200)


async def test_perf_analyzer_streams_from_a_generation_model(
    server: RunningServer, tmp_path: Path
) -> None:
    """A decoupled model: perf_analyzer detects it from ModelConfig, sends Triton's
    generation tensors on streams and counts a request done at its final response."""
    binary = await perf_analyzer()
    data = tmp_path / "prompts.json"
    data.write_text(
        json.dumps(
            {"data": [{"text_input": ["Once upon a time"], "max_tokens": [16], "stream": [True]}]}
        )
    )
    row, _ = await profile(
        binary,
        server,
        tmp_path,
        "tiny_llama",
        concurrency=4,
        requests=40,
        streaming=True,
        input_data=data,
    )
    # Sixteen chunks per request, each one response.
    assert float(row["Response Throughput"]) == pytest.approx(
        16 * float(row["Inferences/Second"]), rel=0.05
    ), row


async def test_perf_analyzer_over_mtls(
    start_server: StartServer, certificates: Certificates, tmp_path: Path
) -> None:
    """``--ssl-grpc-*``: the CA, and the client certificate the server requires."""
    binary = await perf_analyzer()
    server = await start_server(tls=certificates.server_settings())
    tls = (
        *("--ssl-grpc-use-ssl", "true"),
        *("--ssl-grpc-root-certifications-file", str(certificates.ca)),
        *("--ssl-grpc-private-key-file", str(certificates.client_key)),
        *("--ssl-grpc-certificate-chain-file", str(certificates.client_cert)),
    )
    await profile(binary, server, tmp_path, "simple", concurrency=4, requests=200, tls=tls)
    await profile(
        binary, server, tmp_path, "simple", concurrency=4, requests=200, streaming=True, tls=tls
    )
