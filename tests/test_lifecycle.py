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

import grpc
import numpy as np
import pytest

from sluice.lifecycle import HISTORY_FILE, POINTER_FILE, ModelState
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_client.aio import AsyncClient
from sluice_client.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable
from tests.conftest import RunningServer, StartServer
from tests.procfs import status_bytes
from tests.test_cli import sluice
from tests.test_drain import start_process

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


async def _roll_back_to_1(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        await client.load_model("mlp", version="1", reason="candidate")
        await client.promote("mlp", "1", reason="version 2 is bad")


async def _restart_serves_1(start_server: StartServer, repository: Path, state: Path) -> None:
    """A new server on the same repository and state serves version 1, though the default
    policy (``latest: 1``) selects only version 2, and nothing but a load changed it."""
    server = await start_server(repository=repository, lifecycle={"state_dir": state})
    async with AsyncClient(server.address) as client:
        assert await serving(client) == "1"
        assert (await client.infer("mlp", MLP_INPUT)).version == "1"
        assert await client.health("sluice.model.mlp") == "SERVING"
        assert await client.load_model("mlp", reason="reload") == ["1", "2"]
        assert await serving(client) == "1", "a reload never changes what serves"
        history = await client.history("mlp")
    assert [(e.action, e.to_version) for e in history] == [
        ("promote", "2"),
        ("load", "1"),
        ("promote", "1"),
        ("load", ""),
    ]


async def test_a_restart_serves_the_version_promoted_before_it(
    start_server: StartServer, example_repository: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = await start_server(repository=example_repository, lifecycle={"state_dir": state})
    await _roll_back_to_1(first)
    await first.server.drain(0)
    await _restart_serves_1(start_server, example_repository, state)


@pytest.mark.parametrize("lost", [POINTER_FILE, HISTORY_FILE])
async def test_a_crash_inside_a_promote_restarts_on_the_promoted_version(
    start_server: StartServer, example_repository: Path, tmp_path: Path, lost: str
) -> None:
    """The promote's history line reached the disk and its pointer did not (rolled forward
    at start), or the other way round (the history entry is restored from the pointer);
    either way the restarted server loads the version the promote named and serves it."""
    state = tmp_path / "state"
    first = await start_server(repository=example_repository, lifecycle={"state_dir": state})
    async with AsyncClient(first.address) as client:
        await client.load_model("mlp", version="1", reason="candidate")
    before_promote = (state / "mlp" / lost).read_bytes()
    await _roll_back_to_1(first)  # its load is a no-op now: version 1 is loaded
    await first.server.drain(0)
    (state / "mlp" / lost).write_bytes(before_promote)
    await _restart_serves_1(start_server, example_repository, state)


async def test_no_load_changes_what_serves(
    lifecycle_server: RunningServer, example_repository: Path
) -> None:
    await _roll_back_to_1(lifecycle_server)
    shutil.copytree(example_repository / "mlp" / "2", example_repository / "mlp" / "3")
    async with AsyncClient(lifecycle_server.address) as client:
        assert await client.rescan() == (["mlp/3"], [])
        assert await serving(client) == "1"
        async with grpc.aio.insecure_channel(lifecycle_server.address) as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="mlp")
            )
        # The reload loads what the policy selects (3) and the serving version (1).
        assert await serving(client) == "1"
        assert sorted(m.version for m in await client.list_models() if m.name == "mlp") == [
            "1",
            "3",
        ]
        assert (await client.infer("mlp", MLP_INPUT)).version == "1"
        history = await client.history("mlp")
    assert [(e.action, e.to_version) for e in history] == [
        ("promote", "2"),
        ("load", "1"),
        ("promote", "1"),
        ("load", "3"),
        ("load", ""),
    ]


async def _until_ready(client: AsyncClient) -> None:
    """A server process listens before its start-up load ends: wait for it to be ready."""
    async with asyncio.timeout(60):
        while await client.health() != "SERVING":
            await asyncio.sleep(0.05)


async def test_a_killed_server_process_restarts_on_the_promoted_version(
    example_repository: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    proc, port, _ = await start_process(example_repository, {}, processes)
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await _until_ready(client)
        await client.load_model("mlp", version="1")
        await client.promote("mlp", "1")
    proc.kill()  # no drain: the pointer was written, the next start must load its version
    await proc.wait()
    _, port, _ = await start_process(example_repository, {}, processes)
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await _until_ready(client)
        assert await serving(client) == "1"
        assert (await client.infer("mlp", MLP_INPUT)).version == "1"
        assert [e.action for e in await client.history("mlp")] == ["promote", "load", "promote"]


async def test_a_serving_version_gone_at_restart_is_reported_and_nothing_else_serves(
    start_server: StartServer,
    example_repository: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    first = await start_server(repository=example_repository, lifecycle={"state_dir": state})
    await _roll_back_to_1(first)
    await first.server.drain(0)
    shutil.move(example_repository / "mlp" / "1", tmp_path / "mlp-1")
    second = await start_server(repository=example_repository, lifecycle={"state_dir": state})
    assert "model mlp: its serving version 1 failed to load: its folder" in caplog.text
    async with AsyncClient(second.address) as client:
        rows = {m.version: m for m in await client.list_models() if m.name == "mlp"}
        assert rows["1"].state == "UNAVAILABLE" and not rows["1"].serving
        assert "the serving version failed to load" in rows["1"].reason
        assert not rows["2"].serving
        assert await client.health("sluice.model.mlp") == "NOT_SERVING"
        with pytest.raises(Unavailable, match="serving version 1 failed to load"):
            await client.infer("mlp", MLP_INPUT)
        assert (await client.infer("mlp", MLP_INPUT, version="2")).version == "2"
        assert [e.action for e in await client.history("mlp")][-1] == "promote"
        # The files come back: loading the version makes the pointer's version serve again.
        shutil.move(tmp_path / "mlp-1", example_repository / "mlp" / "1")
        await client.load_model("mlp", version="1", reason="files restored")
        assert await serving(client) == "1"
        assert await client.health("sluice.model.mlp") == "SERVING"
        # Or an operator decides that another version serves: a promote, in the history.
        assert await client.promote("mlp", "2", reason="decided") == ("1", "2")
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"


async def test_a_serving_version_that_fails_to_load_may_be_replaced_as_a_recorded_promote(
    start_server: StartServer, example_repository: Path, tmp_path: Path
) -> None:
    settings = {"state_dir": tmp_path / "state", "replace_failed_serving_version": True}
    first = await start_server(repository=example_repository, lifecycle=settings)
    await _roll_back_to_1(first)
    await first.server.drain(0)
    (example_repository / "mlp" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    second = await start_server(repository=example_repository, lifecycle=settings)
    async with AsyncClient(second.address) as client:
        assert await serving(client) == "2"
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"
        rows = {m.version: m for m in await client.list_models() if m.name == "mlp"}
        last = (await client.history("mlp"))[-1]
    assert rows["1"].state == "UNAVAILABLE" and "no candidate backend loaded" in rows["1"].reason
    assert (last.action, last.from_version, last.to_version, last.who) == (
        "promote",
        "1",
        "2",
        "sluice",
    )
    assert last.reason.startswith("replaces the serving version: its serving version 1 failed")


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


async def test_memory_returns_after_load_unload_cycles(lifecycle_server: RunningServer) -> None:
    service = lifecycle_server.service
    sizes = []
    for _ in range(20):
        for name in ("mlp", "tiny_llama", "simple"):
            await service.unload(name, who="test", reason="cycle")
            await service.load(name, who="test", reason="cycle")
        gc.collect()
        sizes.append(status_bytes("VmRSS"))
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
