"""The wheel that the Dockerfile's ``pip install .`` builds carries everything serve needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_wheel_ships_example_models_stubs_and_client(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("sluice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "sluice/example_models/simple/1/model.onnx",
        "sluice/example_models/mlp/config.yaml",
        "sluice/example_models/mlp/2/model.onnx",
        "sluice/example_models/passthrough/1/model.onnx",
        "sluice_api/inference/grpc_service_pb2.py",
        "sluice_api/inference/grpc_service_pb2.pyi",
        "sluice_client/tensors.py",
        "sluice/py.typed",
    ):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sluice = sluice.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
