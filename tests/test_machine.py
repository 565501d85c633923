"""Defaults derived from the machine: the cores a server may use (its CPU affinity, or its
container's CPU quota if lower) and the transport processes ``workers`` chooses from them,
read from real cgroup files written here and checked on a real ``sluice serve``."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from sluice.machine import MAX_DEFAULT_WORKERS, default_workers, usable_cores
from tests.serve_process import serve_process

AFFINITY = len(os.sched_getaffinity(0))
CHOSEN = re.compile(r"workers (\d+), chosen from the machine \((\d+) usable cores\)")


def cgroup_v2(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


def cgroup_v1(tmp_path: Path, quota: str, period: str) -> Path:
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text(quota)
    (folder / "cpu.cfs_period_us").write_text(period)
    return folder


@pytest.mark.parametrize(
    ("text", "quota"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 2), ("50000 100000", 1)],
)
def test_a_cgroup_v2_quota_caps_the_usable_cores(
    tmp_path: Path, text: str, quota: int | None
) -> None:
    missing = tmp_path / "no-v1"
    cores = usable_cores(cgroup_v2=cgroup_v2(tmp_path, text), cgroup_v1=missing)
    assert cores == (AFFINITY if quota is None else min(AFFINITY, quota))


@pytest.mark.parametrize(
    ("quota", "period", "expected"), [("-1", "100000", None), ("200000", "100000", 2)]
)
def test_a_cgroup_v1_quota_caps_the_usable_cores(
    tmp_path: Path, quota: str, period: str, expected: int | None
) -> None:
    folder = cgroup_v1(tmp_path, quota, period)
    cores = usable_cores(cgroup_v2=tmp_path / "none", cgroup_v1=folder)
    assert cores == (AFFINITY if expected is None else min(AFFINITY, expected))


def test_unreadable_or_odd_cgroup_files_leave_the_affinity(tmp_path: Path) -> None:
    odd = cgroup_v2(tmp_path, "a lot\n")
    assert usable_cores(cgroup_v2=odd, cgroup_v1=tmp_path / "none") == AFFINITY
    zero = cgroup_v1(tmp_path, "0", "0")
    assert usable_cores(cgroup_v2=tmp_path / "none", cgroup_v1=zero) == AFFINITY


@pytest.mark.parametrize(
    ("cores", "workers"), [(1, 1), (2, 2), (3, 3), (4, 4), (16, MAX_DEFAULT_WORKERS)]
)
def test_workers_is_one_per_core_at_most_four(cores: int, workers: int) -> None:
    assert default_workers(cores) == workers


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is needed")
@pytest.mark.parametrize("cpus", [1, 2])
async def test_sluice_serve_chooses_its_workers_from_the_cores_it_may_use(
    tmp_path: Path, cpus: int
) -> None:
    """With ``workers`` unset, ``sluice serve`` pinned to one core runs one process; on two,
    two transport processes in front of the engine."""
    if cpus > AFFINITY:
        pytest.skip(f"this machine lets the tests use {AFFINITY} core(s)")
    allowed = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:cpus])
    command = ("taskset", "-c", allowed, sys.executable, "-m", "sluice")
    async with serve_process(command=command, cwd=tmp_path, unset=["SLUICE_WORKERS"]) as server:
        chosen = await server.wait_for(CHOSEN.pattern)
        await server.wait_for("ready: serving")
        assert (int(chosen.group(1)), int(chosen.group(2))) == (default_workers(cpus), cpus)
        assert await server.stop() == 0
    transports = "transport process" in server.log
    assert transports == (cpus > 1), server.log
