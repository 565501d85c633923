"""The Go client (clients/go), built in GOPATH mode against Debian's grpc-go and protobuf
(`/usr/share/gocode`); its own `go test` suite runs against real servers started here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clients.conftest import RETRY_ATTEMPTS, ClientServers
from tests.compat.procs import run
from tests.conftest import REPO_ROOT
from tests.toolchains import DEBIAN_GOPATH

MODULE_DIR = REPO_ROOT / "clients" / "go"
MODULE = "github.com/sluice/sluice/clients/go"
GO = shutil.which("go")

pytestmark = [pytest.mark.slow, pytest.mark.toolchain("go")]

#: Tests in clients/go/sluice/client_test.go, without and with a generation model.
INFERENCE_TESTS = {
    "TestHealth",
    "TestInferSimple",
    "TestInferMLP",
    "TestModelOperations",
    "TestErrors",
    "TestDeadlines",
    "TestUnavailableIsRetriedAfterPushback",
    "TestMutualTLS",
    "TestTLSRefusals",
}
GENERATION_TESTS = {"TestGenerateStreams", "TestGenerateCancelAndDeadline"}


@dataclass(frozen=True)
class Built:
    test_binary: Path
    example: Path
    env: dict[str, str]


def go(*args: str, cwd: Path, env: dict[str, str]) -> str:
    assert GO is not None
    done = subprocess.run(
        [GO, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"go {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The module copied into a private GOPATH, vetted, its test binary and example built."""
    gopath = tmp_path_factory.mktemp("gopath")
    package_dir = gopath / "src" / MODULE
    shutil.copytree(MODULE_DIR, package_dir)
    env = {
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOPATH}",
        "GOFLAGS": "",
        # grpc-go before 1.40 retries only when asked; later versions ignore this.
        "GRPC_GO_RETRY": "on",
    }
    assert GO is not None
    unformatted = subprocess.run(
        [str(Path(GO).with_name("gofmt")), "-l", "sluice", "examples"],
        cwd=package_dir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert unformatted == "", f"gofmt would change: {unformatted}"
    go("vet", "./sluice", "./examples/...", cwd=package_dir, env=env)
    go("build", "./...", cwd=package_dir, env=env)
    binary = gopath / "sluice.test"
    example = gopath / "quickstart"
    go("test", "-c", "-o", str(binary), "./sluice", cwd=package_dir, env=env)
    go("build", "-o", str(example), "./examples/quickstart", cwd=package_dir, env=env)
    return Built(binary, example, env)


async def test_go_test_suite(built: Built, client_servers: ClientServers) -> None:
    done = await run(
        built.test_binary,
        "-test.v",
        "-test.count=1",
        env={**built.env, **client_servers.env()},
        limit_s=180,
    )
    done.check()
    passed = set(re.findall(r"^--- PASS: (\w+)", done.stdout, re.MULTILINE))
    expected = INFERENCE_TESTS | (GENERATION_TESTS if client_servers.generation_model else set())
    assert passed == expected, done.describe()
    assert client_servers.shed_calls() == RETRY_ATTEMPTS
    if not client_servers.generation_model:
        pytest.skip("the server serves no generation model: the generation tests did not run")


async def test_example_runs(built: Built, client_servers: ClientServers) -> None:
    model = client_servers.generation_model
    done = await run(built.example, client_servers.main.address, model or "none", env=built.env)
    assert "health: SERVING" in done.stdout, done.describe()
    assert "simple OUTPUT0: [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16]" in done.stdout
    if model:
        done.check()
        assert re.search(r"\[FINISH_REASON_(STOP|LENGTH), \d+ tokens\]", done.stdout)
    else:
        assert "NotFound" in done.stderr, done.describe()
