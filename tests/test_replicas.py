"""Three Sluice replicas as separate hosts (network namespaces, one address each) sharing
breaker state and serving versions through Redis, under steady load from 32 callers on a
round_robin client: a killed replica, a partitioned one, a rolling restart, a breaker that
opens everywhere, and a promote and a rollback that reach every replica.

Needs root, iproute2 and redis-server: skipped with the reason where the machine lacks one,
failed instead with ``SLUICE_REQUIRE_TOOLCHAINS=1`` (CI). Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from sluice.repository import EXAMPLE_REPOSITORY
from sluice_client.aio import AsyncClient
from sluice_client.errors import Unavailable
from tests.netns import Network, make_network
from tests.redis_server import running_redis
from tests.replicas import (
    ADMIN_TOKEN,
    DEADLINE_S,
    MLP_INPUT,
    Load,
    Replica,
    failed,
    make_repository,
    released_after,
    replica_env,
    replicas_running,
    serving_versions,
    summary,
    until_all_serve,
    until_answering_again,
)

#: The shared pointers are read every lifecycle.sync_interval_s (0.5 s by default): a
#: promote made on one replica serves on every replica within that, plus a poll.
CONVERGE_BOUND_S = 2.0
BASELINE_S = 1.5


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    with make_network(hosts=3) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    with running_redis(root, host=network.address) as redis:
        replicas = [
            Replica(
                host=host,
                repository=make_repository(
                    root / f"models-{n}", EXAMPLE_REPOSITORY, failing=n == 0
                ),
                log=root / f"replica-{n}.log",
                env=replica_env(redis),
            )
            for n, host in enumerate(network.hosts)
        ]
        with replicas_running(replicas):
            yield replicas


@pytest.fixture
def report(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> Iterator[dict[str, object]]:
    """What a test measured, printed under its name once it ends."""
    numbers: dict[str, object] = {}
    yield numbers
    if numbers:
        with capsys.disabled():
            print(f"\n{request.node.name}: {summary(numbers)}")


async def test_a_promote_and_a_rollback_reach_every_replica_with_no_failed_call(
    cluster: list[Replica], report: dict[str, object]
) -> None:
    assert await serving_versions(cluster) == ["2", "2", "2"]
    load = await Load([r.address for r in cluster]).start()
    await load.run_for(BASELINE_S)
    async with AsyncClient(cluster[1].address, admin_token=ADMIN_TOKEN) as admin:
        promoted_at = time.monotonic()
        assert await admin.promote("mlp", "1", reason="canary") == ("2", "1")
        report["promote_everywhere_s"] = await until_all_serve(cluster, "1", CONVERGE_BOUND_S)
        everywhere_1 = time.monotonic()
        await load.run_for(1.0)
        rolled_back_at = time.monotonic()
        assert await admin.rollback("mlp", reason="worse") == ("1", "2")
        report["rollback_everywhere_s"] = await until_all_serve(cluster, "2", CONVERGE_BOUND_S)
        everywhere_2 = time.monotonic()
    await load.run_for(1.0)
    calls = await load.stop()
    report["calls"] = len(calls)
    report["failed"] = len(failed(calls))
    assert not failed(calls), failed(calls)[:5]
    # Every answer names a version that was serving when it was given.
    assert {c.version for c in calls} == {"1", "2"}
    assert all(c.version == "2" for c in calls if c.end < promoted_at)
    between = [c for c in calls if everywhere_1 <= c.start and c.end < rolled_back_at]
    assert between and all(c.version == "1" for c in between)
    assert all(c.version == "2" for c in calls if c.start >= everywhere_2)


async def test_a_breaker_opened_on_one_replica_is_open_on_the_others_within_a_second(
    cluster: list[Replica], report: dict[str, object]
) -> None:
    failing, others = cluster[0], cluster[1:]

    async def breaker(replica: Replica) -> str:
        async with AsyncClient(replica.address) as client:
            rows = [m for m in await client.list_models() if m.name == "flaky"]
        return rows[0].breaker_state

    assert {await breaker(r) for r in cluster} == {"CLOSED"}
    async with AsyncClient(failing.address) as client:
        for _ in range(20):  # each call is tried up to 3 times by the server, 4 by the client
            with pytest.raises(Unavailable):
                await client.infer("flaky", MLP_INPUT)
            if await breaker(failing) == "OPEN":
                break
    opened = time.monotonic()
    assert await breaker(failing) == "OPEN"
    async with asyncio.timeout(1.0):
        while {await breaker(r) for r in others} != {"OPEN"}:
            await asyncio.sleep(0.01)
    report["open_everywhere_s"] = time.monotonic() - opened
    async with AsyncClient(others[0].address) as client:
        with pytest.raises(Unavailable, match="circuit breaker is open"):
            await client.infer("flaky", MLP_INPUT)


async def test_sigkill_of_a_replica_fails_only_its_calls_and_a_restarted_one_serves_the_promote(
    cluster: list[Replica], report: dict[str, object]
) -> None:
    victim, survivors = cluster[2], cluster[:2]
    load = await Load([r.address for r in cluster]).start()
    await load.run_for(BASELINE_S)
    killed_at = time.monotonic()
    victim.kill()
    await load.run_for(4.0)
    calls = await load.stop()
    report["calls"] = len(calls)
    report["failed"] = len(failed(calls))
    report["failures"] = sorted({c.details.split(" (")[0] for c in failed(calls)})
    report["survivors_carry_load_s"] = released_after(calls, at=killed_at, until=killed_at + 4.0)
    # The calls running on the killed replica are retried elsewhere by the client's default
    # policy (its retry throttle has room for a burst as large as the callers).
    assert not failed(calls), failed(calls)[:5]
    # While it is down, version 1 is promoted; restarted, it serves version 1.
    async with AsyncClient(survivors[0].address, admin_token=ADMIN_TOKEN) as admin:
        await admin.promote("mlp", "1", reason="while a replica is down")
        await until_all_serve(survivors, "1", CONVERGE_BOUND_S)
        victim.start()
        await asyncio.to_thread(victim.wait_ready)
        assert await serving_versions([victim]) == ["1"]
        await admin.rollback("mlp", reason="back")
        await until_all_serve(cluster, "2", CONVERGE_BOUND_S)


async def test_a_partitioned_replica_is_left_out_then_taken_back(
    cluster: list[Replica], network: Network, report: dict[str, object]
) -> None:
    cut = cluster[1]
    load = await Load([r.address for r in cluster]).start()
    await load.run_for(BASELINE_S)
    cut_at = time.monotonic()
    network.partition(cut.host)
    try:
        await load.run_for(5.0)
    finally:
        network.heal(cut.host)
    healed_at = time.monotonic()
    await until_answering_again(cut, timeout_s=30)
    report["back_in_rotation_after_heal_s"] = time.monotonic() - healed_at
    await load.run_for(1.0)
    calls = await load.stop()
    report["calls"] = len(calls)
    report["failed"] = len(failed(calls))
    report["failures"] = sorted({c.details.split(" (")[0] for c in failed(calls)})
    report["others_carry_load_s"] = released = released_after(calls, at=cut_at, until=healed_at)
    assert released < DEADLINE_S, "calls stuck on the cut replica end before their deadline"
    # The calls stuck on the cut replica are released when the client's keepalive gives the
    # connection up (not at their deadline), and retried on the others.
    assert not failed(calls), failed(calls)[:5]


async def test_a_rolling_restart_fails_no_call(
    cluster: list[Replica], report: dict[str, object]
) -> None:
    load = await Load([r.address for r in cluster]).start()
    await load.run_for(BASELINE_S)
    started = time.monotonic()
    for replica in cluster:
        assert await asyncio.to_thread(replica.terminate) == 0
        replica.start()
        await asyncio.to_thread(replica.wait_ready)
        await load.run_for(0.5)
    report["rolling_restart_s"] = time.monotonic() - started
    await load.run_for(1.0)
    calls = await load.stop()
    report["calls"] = len(calls)
    report["failed"] = len(failed(calls))
    assert not failed(calls), sorted({(c.code, c.details) for c in failed(calls)})
    assert await serving_versions(cluster) == ["2", "2", "2"]
