"""Triton's Python client (tritonclient.grpc, unchanged) against a real Sluice server.

The server runs in this process on the test's event loop; the client runs in a
subprocess (``tests/compat/tritonclient_checks.py``) because tritonclient's generated
protos clash with ``sluice_api``'s in one process. Never import tritonclient here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.app import EXAMPLE_REPOSITORY
from tests.certs import ADMIN_CN, Certificates
from tests.compat.procs import Completed, run_python
from tests.conftest import RunningServer, StartServer

pytestmark = pytest.mark.toolchain("tritonclient")

SCRIPT = "tritonclient_checks.py"


async def run_checks(
    address: str, *checks: str, limit_s: float = 90.0, tls: tuple[str, ...] = ()
) -> Completed:
    done = await run_python(
        SCRIPT,
        *("--url", address, "--models", str(EXAMPLE_REPOSITORY), *tls),
        *checks,
        limit_s=limit_s,
    )
    done.check()
    results = done.json_lines()
    assert [r["check"] for r in results] == list(checks), done.describe()
    assert all(r["ok"] for r in results), done.describe()
    return done


@pytest.mark.parametrize(
    "check",
    [
        "liveness",
        "server_metadata",
        "model_metadata",
        "model_config",
        "repository_index",
        "infer_simple",
        "infer_mlp",
        "infer_passthrough",
        "big_tensor",
        "bad_input",
        "priority",
        "stream",
        "stream_unordered_arrival",
        "stream_generation",
        "aio",
    ],
)
async def test_tritonclient(server: RunningServer, check: str) -> None:
    await run_checks(server.address, check)


async def test_tritonclient_statistics_grow(server: RunningServer) -> None:
    before = server.service.get("simple").stats.inference_count
    await run_checks(server.address, "statistics")
    # The script's own before/after comparison passed; the server saw the same requests.
    assert server.service.get("simple").stats.inference_count > before


async def test_tritonclient_sees_response_cache_hits(
    start_server: StartServer, example_repository: Path
) -> None:
    (example_repository / "simple" / "config.yaml").write_text("response_cache: {enabled: true}\n")
    running = await start_server(repository=example_repository)
    await run_checks(running.address, "cache_hit")


async def test_tritonclient_load_unload(
    start_server: StartServer, example_repository: Path
) -> None:
    running = await start_server(repository=example_repository)
    await run_checks(running.address, "load_unload")
    assert running.service.is_ready("mlp")
    assert running.service.is_ready("simple")


async def test_tritonclient_over_mtls(
    start_server: StartServer, example_repository: Path, certificates: Certificates
) -> None:
    """``ssl=True`` with the CA, the client certificate and key (sync and asyncio clients),
    admin calls included: the certificate is named in admin.identities."""
    running = await start_server(
        repository=example_repository,
        tls=certificates.server_settings(),
        admin={"identities": [ADMIN_CN]},
    )
    tls = (
        *("--ca-file", str(certificates.ca)),
        *("--cert-file", str(certificates.admin_cert), "--key-file", str(certificates.admin_key)),
    )
    await run_checks(running.address, "liveness", "infer_simple", "stream", "aio", tls=tls)
    await run_checks(running.address, "load_unload", tls=tls)
    assert running.service.is_ready("mlp")
