"""Versions while traffic flows: load beside, promote, rollback, unload, history that
survives crashes and restarts, admin authorization, memory after load / unload cycles."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.lifecycle import HISTORY_FILE, POINTER_FILE, ModelState
from sluice_client.aio import AsyncClient
from sluice_client.errors import FailedPrecondition, NotFound, PermissionDenied
from tests.conftest import RunningServer, StartServer
from tests.test_cli import sluice

MLP_INPUT = {"input": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)}


@pytest.fixture
async def lifecycle_server(
    start_server: StartServer, example_repository: Path, tmp_path: Path
) -> RunningServer:
    return await start_server(
        repository=example_repository, lifecycle={"state_dir": tmp_path / "state"}
    )


async def serving(client: AsyncClient, model: str = "mlp") -> str:
    rows = [m for m in await client.list_models() if m.name == model and m.serving]
    assert len(rows) == 1, rows
    return rows[0].version


# -- the pointer and the history on disk --------------------------------------------------


def test_state_survives_reopening_and_records_every_change(tmp_path: Path) -> None:
    state = ModelState.open(tmp_path)
    state.record("promote", from_version="", to_version="1", who="a", reason="first")
    state.record("promote", from_version="1", to_version="2", who="b", reason="better")
    state.record("rollback", from_version="2", to_version="1", who="c", reason="worse")
    again = ModelState.open(tmp_path)
    assert (again.pointer.serving, again.pointer.previous) == ("1", [])
    assert [(c.seq, c.action, c.to_version, c.who) for c in again.history] == [
        (1, "promote", "1", "a"),
        (2, "promote", "2", "b"),
        (3, "rollback", "1", "c"),
    ]


def test_a_crash_after_the_history_append_rolls_the_change_forward(tmp_path: Path) -> None:
    state = ModelState.open(tmp_path)
    state.record("promote", from_version="", to_version="1", who="a", reason="")
    pointer_before = (tmp_path / POINTER_FILE).read_text()
    state.record("promote", from_version="1", to_version="2", who="a", reason="")
    # The crash: the history line reached the disk, the pointer replacement did not.
    (tmp_path / POINTER_FILE).write_text(pointer_before)
    recovered = ModelState.open(tmp_path)
    assert (recovered.pointer.serving, recovered.pointer.previous) == ("2", ["1"])
    assert json.loads((tmp_path / POINTER_FILE).read_text())["seq"] == 2
    assert [c.seq for c in recovered.history] == [1, 2]


def test_a_crash_that_lost_the_history_append_restores_it_from_the_pointer(
    tmp_path: Path,
) -> None:
    state = ModelState.open(tmp_path)
    state.record("promote", from_version="", to_version="1", who="a", reason="")
    history_before = (tmp_path / HISTORY_FILE).read_text()
    state.record("promote", from_version="1", to_version="2", who="b", reason="why")
    (tmp_path / HISTORY_FILE).write_text(history_before)
    recovered = ModelState.open(tmp_path)
    assert recovered.pointer.serving == "2"
    assert [(c.seq, c.to_version, c.who, c.reason) for c in recovered.history] == [
        (1, "1", "a", ""),
        (2, "2", "b", "why"),
    ]
    assert len((tmp_path / HISTORY_FILE).read_text().splitlines()) == 2


def test_a_torn_history_line_is_dropped(tmp_path: Path) -> None:
    state = ModelState.open(tmp_path)
    state.record("promote", from_version="", to_version="1", who="a", reason="")
    with (tmp_path / HISTORY_FILE).open("a") as history:
        history.write('{"seq": 2, "time": "2026-')  # a crash inside the append
    recovered = ModelState.open(tmp_path)
    assert [c.seq for c in recovered.history] == [1]
    assert recovered.pointer.serving == "1"
    recovered.record("promote", from_version="1", to_version="3", who="a", reason="")
    assert [c.seq for c in ModelState.open(tmp_path).history] == [1, 2]


# -- over a real server ---------------------------------------------------------------


async def test_load_beside_promote_rollback_and_history(lifecycle_server: RunningServer) -> None:
    async with AsyncClient(lifecycle_server.address) as client:
        assert await serving(client) == "2"
        assert await client.load_model("mlp", version="1", reason="candidate") == ["1", "2"]
        assert await serving(client) == "2", "loading a version never changes what serves"
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"
        assert await client.promote("mlp", "1", reason="try it") == ("2", "1")
        assert (await client.infer("mlp", MLP_INPUT)).version == "1"
        assert await client.rollback("mlp", reason="worse") == ("1", "2")
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"
        with pytest.raises(FailedPrecondition, match="serving version"):
            await client.unload_model("mlp", version="2")
        await client.unload_model("mlp", version="1", reason="done")
        history = await client.history("mlp")
    assert [(e.action, e.from_version, e.to_version, e.reason) for e in history] == [
        ("promote", "", "2", "first load"),
        ("load", "", "1", "candidate"),
        ("promote", "2", "1", "try it"),
        ("rollback", "1", "2", "worse"),
        ("unload", "1", "", "done"),
    ]
    assert history[1].who == "local"  # the loopback-only server's caller, never an address


async def test_promote_and_rollback_under_load_fail_no_call(
    lifecycle_server: RunningServer,
) -> None:
    async with AsyncClient(lifecycle_server.address) as client:
        await client.load_model("mlp", version="1")
        stop = asyncio.Event()
        versions: Counter[str] = Counter()

        async def worker() -> None:
            while not stop.is_set():
                result = await client.infer("mlp", MLP_INPUT)  # any failure fails the test
                versions[result.version] += 1

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        for round_ in range(3):
            before = sum(versions.values())
            await client.promote("mlp", "1", reason=f"round {round_}")
            await _until(lambda before=before: sum(versions.values()) > before + 20)
            before = sum(versions.values())
            await client.rollback("mlp", reason=f"round {round_}")
            await _until(lambda before=before: sum(versions.values()) > before + 20)
        await client.unload_model("mlp", version="1")
        stop.set()
        await asyncio.gather(*workers)
    assert set(versions) == {"1", "2"}, versions
    assert versions["1"] > 0 and versions["2"] > 0


async def test_a_version_that_fails_to_load_leaves_the_serving_one_alone(
    lifecycle_server: RunningServer, example_repository: Path
) -> None:
    broken = example_repository / "mlp" / "3"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    async with AsyncClient(lifecycle_server.address) as client:
        with pytest.raises(FailedPrecondition, match=r"mlp/3"):
            await client.load_model("mlp", version="3", reason="bad build")
        assert await serving(client) == "2"
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"
        rows = {m.version: m for m in await client.list_models() if m.name == "mlp"}
        history = await client.history("mlp")
    assert rows["3"].state == "UNAVAILABLE" and rows["3"].reason
    assert history[-1].action == "load_failed" and history[-1].to_version == "3"


async def test_the_serving_pointer_survives_a_restart(
    start_server: StartServer, example_repository: Path, tmp_path: Path
) -> None:
    settings = {"lifecycle": {"state_dir": tmp_path / "state"}}
    first = await start_server(repository=example_repository, **settings)
    async with AsyncClient(first.address) as client:
        await client.load_model("mlp", version="1")
        await client.promote("mlp", "1")
    await first.server.drain(0)
    # The policy serves only version 2 at start-up; the pointer says 1: allow both.
    (example_repository / "mlp" / "config.yaml").write_text(
        (example_repository / "mlp" / "config.yaml").read_text() + "version_policy: {all: true}\n"
    )
    second = await start_server(repository=example_repository, **settings)
    async with AsyncClient(second.address) as client:
        assert await serving(client) == "1"
        assert (await client.infer("mlp", MLP_INPUT)).version == "1"
        assert [e.action for e in await client.history("mlp")][-1] == "promote"


async def test_rescan_loads_new_version_folders_beside_the_serving_one(
    lifecycle_server: RunningServer, example_repository: Path
) -> None:
    shutil.copytree(example_repository / "mlp" / "2", example_repository / "mlp" / "3")
    async with AsyncClient(lifecycle_server.address) as client:
        loaded, failed = await client.rescan()
        assert (loaded, failed) == (["mlp/3"], [])
        assert await serving(client) == "2"
        assert (await client.infer("mlp", MLP_INPUT, version="3")).version == "3"
        assert await client.rescan() == ([], []), "a second rescan finds nothing new"


# -- admin authorization --------------------------------------------------------------


async def test_admin_calls_need_the_configured_token(
    start_server: StartServer, example_repository: Path
) -> None:
    server = await start_server(repository=example_repository, admin={"token": "s3cret"})
    async with AsyncClient(server.address) as anonymous:
        with pytest.raises(PermissionDenied, match="needs the admin credential"):
            await anonymous.load_model("mlp", version="1")
        with pytest.raises(PermissionDenied):
            await anonymous.promote("mlp", "2")
        assert (await anonymous.infer("mlp", MLP_INPUT)).version == "2"  # data plane open
        assert await anonymous.history("mlp")  # reading the history needs no credential
    async with AsyncClient(server.address, admin_token="wrong") as wrong:
        with pytest.raises(PermissionDenied):
            await wrong.load_model("mlp", version="1")
    async with AsyncClient(server.address, admin_token="s3cret") as admin:
        assert await admin.load_model("mlp", version="1") == ["1", "2"]
        assert (await admin.history("mlp"))[-1].who == "admin"


# -- memory -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_memory_returns_after_load_unload_cycles(lifecycle_server: RunningServer) -> None:
    service = lifecycle_server.service
    sizes = []
    for _ in range(20):
        for name in ("mlp", "tiny_llama", "simple"):
            await service.unload(name, who="test", reason="cycle")
            await service.load(name, who="test", reason="cycle")
        gc.collect()
        sizes.append(_rss_bytes())
    growth = (sizes[-1] - sizes[0]) / sizes[0]
    assert growth < 0.05, f"RSS grew {growth:.1%} over 20 cycles: {sizes}"


async def _until(condition: Any) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)


async def test_history_of_an_unknown_model_is_not_found(lifecycle_server: RunningServer) -> None:
    async with AsyncClient(lifecycle_server.address) as client:
        with pytest.raises(NotFound, match="not in the repository"):
            await client.history("no_such_model")


async def test_the_cli_promotes_and_prints_the_history(lifecycle_server: RunningServer) -> None:
    address = ["--url", lifecycle_server.address]
    loaded = await sluice("models", "load", "mlp", "1", "--reason", "candidate", *address)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "loaded versions: 1, 2"
    promoted = await sluice("models", "promote", "mlp", "1", *address)
    assert promoted.stdout.strip() == "serving: 2 -> 1"
    shown = await sluice("models", "history", "mlp", *address)
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()]
    assert lines[0] == ["TIME", "ACTION", "FROM", "TO", "WHO", "REASON"]
    assert [line[1:4] for line in lines[1:]] == [
        ["promote", "-", "2"],
        ["load", "-", "1"],
        ["promote", "2", "1"],
    ]
    assert lines[2][-1] == "candidate"
