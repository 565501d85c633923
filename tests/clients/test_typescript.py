"""The TypeScript client (clients/typescript): `tsc --strict` builds it, and its own
`node --test` suite runs against real servers started here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.clients.conftest import RETRY_ATTEMPTS, ClientServers
from tests.compat.procs import Completed, run
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "clients" / "typescript"
NPM = shutil.which("npm")
NODE = shutil.which("node")

pytestmark = [pytest.mark.slow, pytest.mark.toolchain("node")]

#: Tests in clients/typescript/test/client.test.ts, without and with a generation model.
INFERENCE_TESTS = 13  # TLS included
GENERATION_TESTS = 4


def tap_counts(done: Completed) -> dict[str, int]:
    """The `# pass N`, `# fail N`, `# skipped N` ... summary of node's TAP reporter."""
    return {k: int(v) for k, v in re.findall(r"^# (\w+) (\d+)$", done.stdout, re.MULTILINE)}


def build(*command: str) -> None:
    done = subprocess.run(command, cwd=PACKAGE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def built() -> None:
    """`npm ci` when the dependencies are missing, then `tsc` (strict); no server runs yet."""
    assert NPM is not None
    if not (PACKAGE / "node_modules" / ".bin" / "tsc").exists():
        build(NPM, "ci", "--no-audit", "--no-fund")
    build(str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", ".")


async def test_node_test_suite(built: None, client_servers: ClientServers) -> None:
    assert NODE is not None
    done = await run(
        NODE,
        "--test",
        "--test-reporter=tap",
        "dist/test/",
        cwd=PACKAGE,
        env=client_servers.env(),
        limit_s=180,
    )
    done.check()
    counts = tap_counts(done)
    expected = INFERENCE_TESTS + (GENERATION_TESTS if client_servers.generation_model else 0)
    assert counts.get("pass") == expected, done.describe()
    assert counts.get("fail") == 0, done.describe()
    # The retry test's one call reached the draining server once per attempt.
    assert client_servers.shed_calls() == RETRY_ATTEMPTS
    if not client_servers.generation_model:
        pytest.skip("the server serves no generation model: the generation tests did not run")


async def test_example_runs(built: None, client_servers: ClientServers) -> None:
    assert NODE is not None
    model = client_servers.generation_model
    done = await run(
        NODE,
        "dist/examples/quickstart.js",
        client_servers.main.address,
        model or "none",
        cwd=PACKAGE,
    )
    assert "health: SERVING" in done.stdout, done.describe()
    assert "simple OUTPUT0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16" in done.stdout
    if model:
        done.check()
        assert re.search(r"\[(stop|length), \d+ tokens\]", done.stdout), done.describe()
    else:
        assert "NOT_FOUND" in done.stderr, done.describe()
