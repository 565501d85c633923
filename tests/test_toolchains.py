"""A missing tool skips a test with what to install, or fails it where tools are required."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import toolchains
from tests.conftest import REPO_ROOT


@pytest.fixture
def absent_tool(monkeypatch: pytest.MonkeyPatch) -> str:
    name = "absent-tool-for-this-test"
    toolchain = toolchains.Toolchain(lambda: False, "apt-get install absent-tool")
    monkeypatch.setitem(toolchains.TOOLCHAINS, name, toolchain)
    return name


def test_a_missing_tool_skips_and_says_what_to_install(
    absent_tool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(toolchains.REQUIRE_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        toolchains.require(absent_tool)
    assert str(skipped.value) == f"needs {absent_tool} (install: apt-get install absent-tool)"


def test_where_tools_are_required_a_missing_one_fails(
    absent_tool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(toolchains.REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="SLUICE_REQUIRE_TOOLCHAINS is set"):
        toolchains.require(absent_tool)


def test_present_tools_pass_and_unknown_names_are_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(toolchains.TOOLCHAINS, "here", toolchains.Toolchain(lambda: True, "-"))
    monkeypatch.setenv(toolchains.REQUIRE_VARIABLE, "1")
    toolchains.require("here")
    with pytest.raises(AssertionError, match="unknown toolchain"):
        toolchains.require("no-such-toolchain")


def test_ci_requires_every_toolchain() -> None:
    """.ci/run installs the tools and sets the variable before running the tests."""
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert f"export {toolchains.REQUIRE_VARIABLE}=1\n" in script
    assert script.index(toolchains.REQUIRE_VARIABLE) < script.index("python3 -m pytest")


def test_the_pytriton_python_named_by_the_variable_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``SLUICE_PYTRITON_PYTHON`` is the only place looked at when set: one that is not there
    means no PyTriton toolchain, even where ``.cache/pytriton-venv`` has one."""
    monkeypatch.setenv(toolchains.PYTRITON_VARIABLE, str(tmp_path / "no-such-python"))
    toolchains.pytriton_python.cache_clear()
    try:
        assert toolchains.pytriton_python() is None
    finally:
        toolchains.pytriton_python.cache_clear()


def test_ci_and_the_readme_install_the_pytriton_the_toolchain_names() -> None:
    """One set of pins: what the skip reason says, what .ci/run installs, what README says."""
    script = (REPO_ROOT / ".ci" / "run").read_text()
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert f"{toolchains.PYTRITON_PACKAGES}\n" in script
    assert "python3 -m venv .cache/pytriton-venv" in script
    assert script.index(".cache/pytriton-venv") < script.index("python3 -m pytest")
    assert toolchains.PYTRITON_PACKAGES in readme
    assert toolchains.TOOLCHAINS["pytriton"].install.startswith(
        "python3 -m venv .cache/pytriton-venv"
    )
