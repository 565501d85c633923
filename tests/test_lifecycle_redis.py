"""Serving pointers and histories shared by replicas through a real Redis: atomic changes,
overtaken changes refused, replicas that follow a promote and a rollback made elsewhere,
and a replica that starts later serving what was promoted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pytest

from sluice.errors import UnavailableError
from sluice.lifecycle_redis import RedisLifecycleStore, ServingChangedError
from sluice.settings import LifecycleSettings, Settings
from sluice_client.aio import AsyncClient
from sluice_client.errors import FailedPrecondition, Unavailable
from tests.conftest import RunningServer, StartServer
from tests.redis_server import free_port, running_redis

MLP_INPUT = {"input": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)}
SYNC_S = 0.1
#: How long a test waits for a replica to follow (many sync intervals: a slow shared CI
#: machine; the check is that it happens, not how fast).
FOLLOW_WAIT_S = 20.0


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path) as url:
        yield url


def store(url: str) -> RedisLifecycleStore:
    return RedisLifecycleStore.connect(LifecycleSettings(redis_url=url, sync_interval_s=SYNC_S))


def test_a_change_on_one_replica_is_the_shared_state_of_all(redis_url: str) -> None:
    one, two = store(redis_url), store(redis_url)
    a, b = one.open("mlp"), two.open("mlp")
    a.record("promote", from_version="", to_version="2", who="sluice", reason="first load")
    a.record("promote", from_version="2", to_version="1", who="ops", reason="try 1")
    assert a.pointer.serving == "1" and a.pointer.previous == ["2"]
    assert b.pointer.serving == "", "a replica serves its own copy until it follows"
    shared = two.shared_pointers(["mlp", "simple"])
    assert list(shared) == ["mlp"]
    b.adopt(shared["mlp"])
    assert (b.pointer.serving, b.pointer.previous, b.pointer.seq) == ("1", ["2"], 2)
    b.record("rollback", from_version="1", to_version="2", who="ops", reason="worse")
    assert [(c.seq, c.action, c.to_version, c.who) for c in a.history] == [
        (1, "promote", "2", "sluice"),
        (2, "promote", "1", "ops"),
        (3, "rollback", "2", "ops"),
    ]
    assert store(redis_url).open("mlp").pointer.serving == "2", "a later replica starts on it"


def test_an_overtaken_change_is_refused_and_changes_nothing(redis_url: str) -> None:
    a, b = store(redis_url).open("mlp"), store(redis_url).open("mlp")
    a.record("promote", from_version="", to_version="2", who="sluice", reason="first load")
    b.adopt(store(redis_url).shared_pointers(["mlp"])["mlp"])
    a.record("promote", from_version="2", to_version="1", who="ops", reason="")
    # b has not followed yet: it still serves 2, and asks to move from 2.
    with pytest.raises(ServingChangedError, match="changed on another replica"):
        b.record("promote", from_version="2", to_version="3", who="ops", reason="")
    assert [c.to_version for c in a.history] == ["2", "1"]
    # The same promote made by two replicas (all starting at once) is taken as done once.
    c = store(redis_url).open("simple")
    d = store(redis_url).open("simple")
    first = c.record("promote", from_version="", to_version="1", who="sluice", reason="first")
    again = d.record("promote", from_version="", to_version="1", who="sluice", reason="first")
    assert again == first and d.pointer.serving == "1"
    assert len(c.history) == 1


def test_concurrent_changes_each_get_their_own_sequence_number(redis_url: str) -> None:
    replicas = [store(redis_url).open("mlp") for _ in range(4)]

    def record_loads(state_index: int) -> None:
        for n in range(10):
            replicas[state_index].record(
                "load", from_version="", to_version="1", who=f"r{state_index}", reason=str(n)
            )

    threads = [threading.Thread(target=record_loads, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = replicas[0].history
    assert [change.seq for change in history] == list(range(1, 41))
    assert store(redis_url).shared_pointers(["mlp"])["mlp"].seq == 40


def test_an_unreachable_redis_is_unavailable_not_a_crash() -> None:
    unreachable = store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(UnavailableError, match="cannot be reached"):
        unreachable.open("mlp")


def test_redis_and_a_state_directory_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="exclude each other"):
        LifecycleSettings(redis_url="redis://127.0.0.1:6379/0", state_dir=tmp_path)


# -- servers ----------------------------------------------------------------------------


@pytest.fixture
def two_version_repository(example_repository: Path) -> Path:
    config = example_repository / "mlp" / "config.yaml"
    config.write_text(config.read_text() + "version_policy: {all: true}\n")
    return example_repository


async def replica(start: StartServer, repository: Path, url: str) -> RunningServer:
    return await start(
        repository=repository, lifecycle={"redis_url": url, "sync_interval_s": SYNC_S}
    )


async def served_version(server: RunningServer) -> str:
    async with AsyncClient(server.address) as client:
        return (await client.infer("mlp", MLP_INPUT)).version


async def until_served(server: RunningServer, version: str) -> None:
    async with asyncio.timeout(FOLLOW_WAIT_S):
        while await served_version(server) != version:
            await asyncio.sleep(SYNC_S / 2)


async def test_replicas_follow_a_promote_and_a_rollback_made_on_one_of_them(
    start_server: StartServer, two_version_repository: Path, redis_url: str
) -> None:
    a = await replica(start_server, two_version_repository, redis_url)
    b = await replica(start_server, two_version_repository, redis_url)
    assert await served_version(a) == await served_version(b) == "2"
    async with AsyncClient(a.address) as client:
        assert await client.promote("mlp", "1", reason="canary") == ("2", "1")
    await until_served(b, "1")
    late = await replica(start_server, two_version_repository, redis_url)
    assert await served_version(late) == "1", "a replica that starts later serves the promote"
    async with AsyncClient(b.address) as client:
        assert await client.rollback("mlp", reason="worse") == ("1", "2")
        history = await client.history("mlp")
    await until_served(a, "2")
    await until_served(late, "2")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("promote", "", "2"),
        ("promote", "2", "1"),
        ("rollback", "1", "2"),
    ]
    async with AsyncClient(late.address) as client:
        assert [e.to_version for e in await client.history("mlp")] == ["2", "1", "2"]


async def test_a_replica_loads_a_version_promoted_elsewhere_before_serving_it(
    start_server: StartServer, example_repository: Path, tmp_path: Path, redis_url: str
) -> None:
    # b's policy loads only the latest version; a promotes version 1 (loaded beside).
    other = tmp_path / "other"
    (other / "mlp").mkdir(parents=True)
    for version in ("1", "2"):
        (other / "mlp" / version).symlink_to(example_repository / "mlp" / version)
    a = await replica(start_server, example_repository, redis_url)
    b = await replica(start_server, other, redis_url)
    async with AsyncClient(a.address) as client:
        await client.load_model("mlp", version="1")
        await client.promote("mlp", "1", reason="canary")
    await until_served(b, "1")
    async with AsyncClient(b.address) as client:
        rows = {m.version: m.serving for m in await client.list_models() if m.name == "mlp"}
    assert rows == {"1": True, "2": False}


async def test_a_promote_that_redis_cannot_record_fails_and_changes_nothing(
    start_server: StartServer, two_version_repository: Path, tmp_path: Path
) -> None:
    with running_redis(tmp_path) as url:
        server = await replica(start_server, two_version_repository, url)
    async with AsyncClient(server.address, timeout_s=10) as client:
        with pytest.raises(Unavailable, match="cannot be reached"):
            await client.promote("mlp", "1", reason="canary")
        assert (await client.infer("mlp", MLP_INPUT)).version == "2"


def test_settings_take_a_lifecycle_redis_url() -> None:
    settings = Settings.model_validate({"lifecycle": {"redis_url": "redis://h:6379/0"}})
    assert settings.lifecycle.redis_url == "redis://h:6379/0"
    assert settings.lifecycle.sync_interval_s == 0.5


async def test_a_replica_that_has_not_followed_yet_cannot_undo_a_change_made_elsewhere(
    start_server: StartServer, two_version_repository: Path, redis_url: str
) -> None:
    a = await replica(start_server, two_version_repository, redis_url)
    lifecycle = {"redis_url": redis_url, "sync_interval_s": 600}
    stale = await start_server(repository=two_version_repository, lifecycle=lifecycle)
    async with AsyncClient(a.address) as client:
        await client.promote("mlp", "1", reason="canary")
    async with AsyncClient(stale.address) as client:
        assert await client.infer("mlp", MLP_INPUT) is not None
        with pytest.raises(FailedPrecondition, match="changed on another replica"):
            await client.promote("mlp", "2", reason="from a stale view")
        assert [e.to_version for e in await client.history("mlp")] == ["2", "1"]
