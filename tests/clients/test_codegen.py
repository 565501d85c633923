"""Generated TypeScript and Go code is current, and `buf breaking` guards the API against
the previous commit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BUF_PREFIX = REPO_ROOT / ".cache" / "buf"
BUF = BUF_PREFIX / "node_modules" / ".bin" / "buf"
BUF_PACKAGE = "@bufbuild/buf@1.75.0"
GENERATED_DIRS = ("clients/typescript/src/gen", "clients/go/gen")
TIMEOUT_S = 300


def run(*command: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


pytestmark = pytest.mark.toolchain("node", "protoc-gen-go")


@pytest.fixture(scope="module")
def buf() -> Path:
    """The pinned buf from npm, installed into .cache/buf (git-ignored) when missing."""
    if not BUF.exists():
        npm = shutil.which("npm")
        assert npm is not None
        done = run(npm, "install", "--prefix", BUF_PREFIX, BUF_PACKAGE)
        assert done.returncode == 0, done.stdout + done.stderr
    return BUF


def test_generated_typescript_and_go_are_up_to_date() -> None:
    """scripts/gen_protos.py --check regenerates every language (buf.gen.yaml for these)."""
    done = run(sys.executable, REPO_ROOT / "scripts" / "gen_protos.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    for directory in GENERATED_DIRS:
        assert any((REPO_ROOT / directory).rglob("*.*")), f"{directory} is empty"


def previous_commit() -> str:
    """HEAD~1, or a skip that says why this clone has none."""
    if run("git", "rev-parse", "--verify", "-q", "HEAD~1").returncode == 0:
        return "HEAD~1"
    shallow = run("git", "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    if shallow:
        pytest.skip("a shallow clone has no previous commit (fetch with --depth 2 or more)")
    pytest.skip("HEAD is the first commit: there is no previous API to compare with")


def test_buf_breaking_against_the_previous_commit(buf: Path) -> None:
    """The protos (as in the working tree) keep the wire API of the previous commit."""
    ref = previous_commit()
    done = run(buf, "breaking", "--against", f".git#ref={ref}")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_breaking_catches_a_removed_field(buf: Path, tmp_path: Path) -> None:
    """The guard is not vacuous: deleting a field from a copy of the protos fails it."""
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "sluice" / "v1" / "generation_service.proto"
    text = proto.read_text()
    assert "  string prompt = 3;\n" in text
    proto.write_text(text.replace("  string prompt = 3;\n", "", 1))
    done = run(buf, "breaking", "--against", REPO_ROOT / "protos", cwd=tmp_path)
    assert done.returncode != 0, textwrap.shorten(done.stdout, 500)
    assert "prompt" in done.stdout, done.stdout
