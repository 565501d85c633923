"""The event loop setting: uvloop by default where it is installed, asyncio's on request,
and a clear refusal when uvloop is asked for and missing."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from sluice.errors import ConfigError
from sluice.eventloop import loop_factory, loop_name
from sluice.settings import load_settings


def _made_by(choice: str) -> str:
    loop = loop_factory(choice)()  # type: ignore[arg-type]
    try:
        return loop_name(loop)
    finally:
        loop.close()


def test_auto_is_uvloop_where_installed_and_asyncio_is_the_standard_loop() -> None:
    assert _made_by("auto") == "uvloop"  # a dependency of the package
    assert _made_by("uvloop") == "uvloop"
    loop = loop_factory("asyncio")()
    try:
        assert type(loop) is asyncio.SelectorEventLoop
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert _made_by("auto") == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_the_server_refuses_to_start_without_uvloop_when_asked_for_it_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sluice import app

    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setenv("SLUICE_EVENT_LOOP", "uvloop")
    with caplog.at_level(logging.ERROR, logger="sluice.app"):
        assert app.run(load_settings()) == 1
    assert "cannot start: event_loop is uvloop, but uvloop is not installed" in caplog.text


def test_the_setting_defaults_to_auto_and_takes_only_known_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().event_loop == "auto"
    monkeypatch.setenv("SLUICE_EVENT_LOOP", "asyncio")
    assert load_settings().event_loop == "asyncio"
    monkeypatch.setenv("SLUICE_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        load_settings()
