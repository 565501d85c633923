"""Static checks run with the suite, so README's one test command covers them too."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

LINTED = ["server", "clients/python/sluice_client", "tests", "scripts", "bench"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )


def test_ruff_check() -> None:
    result = run("ruff", "check", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run("ruff", "format", "--check", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_server() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
