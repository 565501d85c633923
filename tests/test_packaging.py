"""The wheel that the Dockerfile's ``pip install .`` builds carries everything serve needs,
and installs and serves from a fresh environment at both ends of the protobuf range."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from tests.compat.procs import run
from tests.conftest import REPO_ROOT
from tests.serve_process import serve_process

#: The packages whose releases are tied to protobuf's: their floors are tried together.
PROTOBUF_FAMILY = (
    "protobuf",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
    "googleapis-common-protos",
)
#: The one torch build the project installs (a range could pull another, CUDA, build).
TORCH = "torch==2.13.0"
PIP_LIMIT_S = 600


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(out), str(REPO_ROOT)], check=True)
    (built,) = out.glob("sluice-*.whl")
    return built


def test_wheel_ships_example_models_stubs_and_client(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "sluice/example_models/simple/1/model.onnx",
        "sluice/example_models/mlp/config.yaml",
        "sluice/example_models/mlp/2/model.onnx",
        "sluice/example_models/passthrough/1/model.onnx",
        "sluice/example_models/tiny_llama/1/model.safetensors",
        "sluice_api/inference/grpc_service_pb2.py",
        "sluice_api/inference/grpc_service_pb2.pyi",
        "sluice_client/tensors.py",
        "sluice/py.typed",
    ):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sluice = sluice.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def floors() -> list[str]:
    """``name==floor`` for each of PROTOBUF_FAMILY, from pyproject.toml's ``>=`` bounds."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = []
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name in PROTOBUF_FAMILY:
            (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
            pins.append(f"{requirement.name}=={floor}")
    assert len(pins) == len(PROTOBUF_FAMILY), pins
    return pins


ENVIRONMENTS = {
    # The oldest releases the dependency ranges allow: what the floors promise works.
    "protobuf-6-floors": (6, floors()),
    # The newest releases, protobuf 7 included.
    "protobuf-7-newest": (7, ["protobuf>=7,<8"]),
}


async def pip(venv: Path, *args: str | Path) -> None:
    """This interpreter's pip, working on ``venv`` (which needs no pip of its own)."""
    command = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    (await run(*command, "--disable-pip-version-check", *args, limit_s=PIP_LIMIT_S)).check()


@pytest.mark.slow
@pytest.mark.parametrize("environment", list(ENVIRONMENTS))
async def test_the_wheel_installs_and_serves_in_a_fresh_environment(
    environment: str, wheel: Path, tmp_path: Path
) -> None:
    """A fresh venv: torch as the project installs it, then the wheel with its dependencies
    resolved under the environment's constraints; `sluice serve` from it answers a
    ModelInfer and a generation from that venv's own `sluice` client commands."""
    major, constraints = ENVIRONMENTS[environment]
    venv = tmp_path / "venv"
    (await run(sys.executable, "-m", "venv", "--without-pip", venv, limit_s=120)).check()
    python, sluice = venv / "bin" / "python", venv / "bin" / "sluice"
    (tmp_path / "constraints.txt").write_text("\n".join([TORCH, *constraints]) + "\n")
    await pip(venv, "install", "-q", TORCH)
    await pip(venv, "install", "-q", "-c", tmp_path / "constraints.txt", wheel)
    await pip(venv, "check")
    version = await run(python, "-c", "import google.protobuf as p; print(p.__version__)")
    assert version.check().stdout.startswith(f"{major}."), version.stdout

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    np.save(tmp_path / "a.npy", a)
    async with serve_process(command=[sluice], cwd=tmp_path) as server:
        await server.wait_for(r"ready: serving ")
        address = await server.address()
        infer = await run(
            sluice,
            "infer",
            "simple",
            "--url",
            address,
            "--input",
            f"INPUT0={tmp_path / 'a.npy'}",
            "--input",
            f"INPUT1={tmp_path / 'a.npy'}",
            "--output-dir",
            tmp_path / "out",
            cwd=tmp_path,
        )
        generate = await run(
            sluice,
            "generate",
            "tiny_llama",
            "Once upon a time",
            "--url",
            address,
            "--max-new-tokens",
            "8",
            "--verbose",
            cwd=tmp_path,
        )
        assert await server.stop() == 0
    assert "OUTPUT0  INT32  [1, 16]" in infer.check().stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "OUTPUT0.npy"), a + a)
    assert generate.check().stdout.strip()
    assert "completion_tokens=8" in generate.stderr
    assert "Traceback" not in server.log and "Warning" not in server.log, server.log
