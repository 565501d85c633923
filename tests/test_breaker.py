"""Backend breakers: what counts against them, the half-open bound, listeners, and state that
outlives a restart (a JSON state file, or Redis shared by replicas). Time moves on fake
monotonic and wall clocks; nothing sleeps."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.breaker import BackendBreaker
from sluice.breaker_state import (
    BreakerSnapshot,
    BreakerStateStore,
    MemoryBreakerStore,
    open_breaker_store,
)
from sluice.errors import BreakerOpenError, ConfigError, ExecutorError, InvalidInputError
from sluice.settings import BreakerSettings
from tests import toolchains
from tests.conftest import FakeClock

KEY = "mlp/1/onnxruntime"
SETTINGS = BreakerSettings(fail_max=3, reset_timeout_s=30.0)
UNIX_NOW = 1_700_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(start=UNIX_NOW)


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "breakers.json"


def fail(breaker: BackendBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ExecutorError), breaker.calling():
            raise ExecutorError("the backend fell over")


def succeed(breaker: BackendBreaker) -> None:
    with breaker.calling():
        pass


def assert_fails_fast(breaker: BackendBreaker) -> None:
    assert breaker.is_open()
    with pytest.raises(BreakerOpenError), breaker.calling():
        pytest.fail("the call reached the backend")


def opened(breaker: BackendBreaker) -> BackendBreaker:
    fail(breaker, SETTINGS.fail_max)
    assert breaker.state == "open"
    return breaker


def saved_states(path: Path) -> dict[str, str]:
    document = json.loads(path.read_text())
    return {key: entry["state"] for key, entry in document["breakers"].items()}


# -- counting ------------------------------------------------------------------------------


def test_opens_after_fail_max_backend_faults(clock: FakeClock) -> None:
    breaker = BackendBreaker(KEY, SETTINGS, clock=clock)
    fail(breaker, SETTINGS.fail_max - 1)
    assert breaker.state == "closed"
    assert not breaker.is_open()
    fail(breaker)
    assert breaker.state == "open"
    assert_fails_fast(breaker)
    clock.advance(SETTINGS.reset_timeout_s - 0.1)
    assert_fails_fast(breaker)


def test_invalid_input_never_counts(clock: FakeClock) -> None:
    breaker = BackendBreaker(KEY, SETTINGS, clock=clock)
    fail(breaker, SETTINGS.fail_max - 1)
    for _ in range(SETTINGS.fail_max * 2):
        with pytest.raises(InvalidInputError), breaker.calling():
            raise InvalidInputError("bad tensor")
    fail(breaker, SETTINGS.fail_max - 1)
    assert breaker.state == "closed"


# -- half-open -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_calls", [1, 3])
def test_half_open_admits_a_bounded_number_of_trials(clock: FakeClock, max_calls: int) -> None:
    settings = BreakerSettings(fail_max=3, reset_timeout_s=30.0, half_open_max_calls=max_calls)
    heard: list[tuple[str, str]] = []
    breaker = BackendBreaker(
        KEY, settings, clock=clock, on_change=lambda old, new: heard.append((old, new))
    )
    opened(breaker)
    clock.advance(settings.reset_timeout_s)
    assert not breaker.is_open()
    with contextlib.ExitStack() as trials:
        for _ in range(max_calls):
            trials.enter_context(breaker.calling())
        assert breaker.state == "half-open"
        assert_fails_fast(breaker)
    assert breaker.state == "closed"
    assert not breaker.is_open()
    assert heard == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_a_failed_trial_reopens_and_frees_its_slot(clock: FakeClock) -> None:
    breaker = opened(BackendBreaker(KEY, SETTINGS, clock=clock))
    clock.advance(SETTINGS.reset_timeout_s)
    fail(breaker)
    assert breaker.state == "open"
    assert_fails_fast(breaker)
    clock.advance(SETTINGS.reset_timeout_s)
    succeed(breaker)
    assert breaker.state == "closed"


def test_closing_takes_success_threshold_trials_one_at_a_time(clock: FakeClock) -> None:
    settings = BreakerSettings(fail_max=3, reset_timeout_s=30.0, success_threshold=2)
    breaker = opened(BackendBreaker(KEY, settings, clock=clock))
    clock.advance(settings.reset_timeout_s)
    with breaker.calling():
        assert_fails_fast(breaker)
    assert breaker.state == "half-open"
    succeed(breaker)
    assert breaker.state == "closed"


# -- listeners -----------------------------------------------------------------------------


def test_listeners_hear_every_change(clock: FakeClock) -> None:
    heard: list[tuple[str, str]] = []
    also: list[tuple[str, str]] = []
    breaker = BackendBreaker(
        KEY,
        SETTINGS,
        clock=clock,
        on_change=lambda old, new: heard.append((old, new)),
        listeners=[lambda old, new: also.append((old, new))],
    )
    opened(breaker)
    clock.advance(SETTINGS.reset_timeout_s)
    succeed(breaker)
    assert heard == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    assert also == heard


def test_a_failing_listener_is_logged_and_the_breaker_still_works(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_old: str, _new: str) -> None:
        raise RuntimeError("metrics bug")

    breaker = opened(BackendBreaker(KEY, SETTINGS, clock=clock, on_change=broken))
    assert_fails_fast(breaker)
    assert any("state listener failed" in record.message for record in caplog.records)


# -- the state file ------------------------------------------------------------------------


def test_state_file_is_valid_json_after_every_transition(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    on_disk: list[str] = []
    store = BreakerStateStore(state_file, wall_clock=wall)
    other = BackendBreaker("mlp/2/onnxruntime", SETTINGS, clock=clock, store=store)
    breaker = BackendBreaker(
        KEY,
        SETTINGS,
        clock=clock,
        store=store,
        listeners=[lambda _old, _new: on_disk.append(saved_states(state_file)[KEY])],
    )
    opened(other)
    opened(breaker)
    clock.advance(SETTINGS.reset_timeout_s)
    succeed(breaker)
    assert on_disk == ["open", "half-open", "closed"]
    assert saved_states(state_file) == {"mlp/2/onnxruntime": "open", KEY: "closed"}
    assert list(state_file.parent.iterdir()) == [state_file]


def test_a_failed_write_keeps_the_previous_file(
    clock: FakeClock,
    wall: FakeClock,
    state_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    breaker = opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))

    def disk_full(_src: object, _dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    clock.advance(SETTINGS.reset_timeout_s)
    succeed(breaker)
    monkeypatch.undo()
    assert breaker.state == "closed"
    assert saved_states(state_file) == {KEY: "open"}
    assert list(state_file.parent.iterdir()) == [state_file]
    assert any("No space left" in record.message for record in caplog.records)


def test_store_moves_open_time_on_by_the_wall_clock_gap(wall: FakeClock, state_file: Path) -> None:
    BreakerStateStore(state_file, wall_clock=wall).save(KEY, BreakerSnapshot("open", 3, 10.0))
    wall.advance(5.0)
    assert BreakerStateStore(state_file, wall_clock=wall).restore(KEY) == BreakerSnapshot(
        "open", 3, 15.0
    )
    wall.advance(-100.0)  # the wall clock stepped back: no time counts as passed
    assert BreakerStateStore(state_file, wall_clock=wall).restore(KEY) == BreakerSnapshot(
        "open", 3, 10.0
    )


def restart(state_file: Path, wall: FakeClock) -> tuple[BackendBreaker, FakeClock]:
    """A new process: a fresh monotonic clock (another origin), store and breaker."""
    clock = FakeClock(start=5.0)
    store = BreakerStateStore(state_file, wall_clock=wall)
    return BackendBreaker(KEY, SETTINGS, clock=clock, store=store), clock


def test_open_breaker_comes_back_open_for_the_rest_of_its_timeout(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))
    wall.advance(10.0)
    breaker, clock = restart(state_file, wall)
    assert breaker.state == "open"
    clock.advance(19.9)
    assert_fails_fast(breaker)
    clock.advance(0.2)
    assert not breaker.is_open()
    succeed(breaker)
    assert breaker.state == "closed"


def test_breaker_whose_timeout_passed_comes_back_half_open(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))
    wall.advance(45.0)
    breaker, _ = restart(state_file, wall)
    assert breaker.state == "half-open"
    with breaker.calling():
        assert_fails_fast(breaker)
    assert breaker.state == "closed"


def test_wall_clock_stepping_back_keeps_the_whole_timeout(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))
    wall.advance(-3600.0)
    breaker, clock = restart(state_file, wall)
    clock.advance(SETTINGS.reset_timeout_s - 0.1)
    assert_fails_fast(breaker)


def test_closed_breaker_comes_back_closed(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    breaker = opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))
    clock.advance(SETTINGS.reset_timeout_s)
    succeed(breaker)
    breaker, _ = restart(state_file, wall)
    assert breaker.state == "closed"
    fail(breaker, SETTINGS.fail_max - 1)  # the counter came back at zero
    assert breaker.state == "closed"


def test_leftover_temp_file_never_breaks_restore(
    clock: FakeClock, wall: FakeClock, state_file: Path
) -> None:
    store = BreakerStateStore(state_file, wall_clock=wall)
    opened(BackendBreaker(KEY, SETTINGS, clock=clock, store=store))
    (state_file.parent / f".{state_file.name}.k2j4x.tmp").write_text('{"format": 1, "bre')
    breaker, _ = restart(state_file, wall)
    assert breaker.state == "open"


@pytest.mark.parametrize(
    "contents",
    [
        "{not json",
        "[]",
        '{"format": 1, "breakers": {"mlp/1/onnxruntime": {"state": "ajar"}}}',
        '{"format": 99, "breakers": {}}',
    ],
)
def test_corrupt_state_file_is_logged_and_ignored(
    clock: FakeClock, state_file: Path, caplog: pytest.LogCaptureFixture, contents: str
) -> None:
    state_file.parent.mkdir()
    state_file.write_text(contents)
    with caplog.at_level(logging.WARNING, logger="sluice.breaker_state"):
        store = BreakerStateStore(state_file)
    assert any(
        record.levelno == logging.WARNING and str(state_file) in record.getMessage()
        for record in caplog.records
    )
    breaker = BackendBreaker(KEY, SETTINGS, clock=clock, store=store)
    assert breaker.state == "closed"
    opened(breaker)
    assert saved_states(state_file) == {KEY: "open"}


def test_unreadable_state_file_is_logged_and_ignored(
    state_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_file.mkdir(parents=True)  # a directory where the file should be
    store = BreakerStateStore(state_file)
    assert store.restore(KEY) is None
    assert any(str(state_file) in record.getMessage() for record in caplog.records)


# -- choosing a store ----------------------------------------------------------------------


def test_store_follows_the_settings(state_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_breaker_store(BreakerSettings()), MemoryBreakerStore)
    store = open_breaker_store(BreakerSettings(state_file=state_file))
    assert isinstance(store, BreakerStateStore)
    assert store.path == state_file
    with pytest.raises(ConfigError, match="exclude each other"):
        open_breaker_store(BreakerSettings(state_file=state_file, redis_url="redis://x"))
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match="'redis' package is not installed"):
        open_breaker_store(BreakerSettings(redis_url="redis://127.0.0.1:6379/0"))


# -- Redis ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def redis_package() -> None:
    toolchains.require("redis")


@pytest.fixture
def redis_url(redis_package: None, tmp_path: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port, stopped after the test."""
    toolchains.require("redis-server")
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    command = [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(tmp_path), "--logfile", ""]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        assert server.stdout is not None
        try:
            if not any("Ready to accept connections" in line for line in server.stdout):
                pytest.fail(f"redis-server on port {port} exited with {server.wait()}")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_replicas_share_breaker_state_through_redis(redis_url: str) -> None:
    import redis

    settings = BreakerSettings(fail_max=3, reset_timeout_s=30.0, redis_url=redis_url)
    replicas = [
        BackendBreaker(KEY, settings, clock=FakeClock(), store=open_breaker_store(settings))
        for _ in range(2)
    ]
    one, two = replicas
    fail(one, settings.fail_max)
    assert two.state == "open"
    assert_fails_fast(two)
    restarted = BackendBreaker(KEY, settings, clock=FakeClock(), store=open_breaker_store(settings))
    assert_fails_fast(restarted)
    # With Redis the reset timeout follows the wall clock: move the open time back by hand.
    with redis.Redis.from_url(redis_url) as client:
        opened_at = f"sluice:{KEY}:pybreaker:opened_at"
        client.set(opened_at, int(client.get(opened_at) or 0) - 31)
    succeed(two)
    assert one.state == "closed"


def test_unreachable_redis_leaves_breaker_state_in_memory(
    redis_package: None, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = BreakerSettings(
        fail_max=3, reset_timeout_s=30.0, redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    breaker = BackendBreaker(KEY, settings, clock=clock, store=open_breaker_store(settings))
    assert any("Redis is unreachable" in record.message for record in caplog.records)
    opened(breaker)
    assert_fails_fast(breaker)


def test_redis_url_must_be_a_redis_url(redis_package: None) -> None:
    with pytest.raises(ConfigError, match="not a Redis URL"):
        open_breaker_store(BreakerSettings(redis_url="http://127.0.0.1/"))
