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


def cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup tree under ``tmp_path`` (``files``: path -> text) and a /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    membership = tmp_path / "proc-self-cgroup"
    membership.write_text(proc)
    return root, membership


def cores(tmp_path: Path, proc: str, files: dict[str, str]) -> int:
    root, membership = cgroups(tmp_path, proc, files)
    return usable_cores(cgroup_root=root, proc_cgroup=membership)


@pytest.mark.parametrize(
    ("text", "quota"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 2), ("50000 100000", 1)],
)
def test_a_cgroup_v2_quota_caps_the_usable_cores(
    tmp_path: Path, text: str, quota: int | None
) -> None:
    # A container with its own cgroup namespace: its cgroup is the root it sees.
    found = cores(tmp_path, "0::/\n", {"cpu.max": text})
    assert found == (AFFINITY if quota is None else min(AFFINITY, quota))


def test_a_quota_on_any_cgroup_above_the_process_counts(tmp_path: Path) -> None:
    """A service's own cgroup, a pod's parent cgroup: the lowest quota on the way up."""
    files = {
        "kubepods/cpu.max": "100000 100000\n",
        "kubepods/pod1/cpu.max": "max 100000\n",
        "kubepods/pod1/app/cgroup.procs": "",
    }
    assert cores(tmp_path / "a", "0::/kubepods/pod1/app\n", files) == 1
    service = {"system.slice/sluice.service/cpu.max": "100000 100000\n"}
    assert cores(tmp_path / "b", "0::/system.slice/sluice.service\n", service) == 1
    # A path from another cgroup namespace (not in this tree): the root alone is read.
    assert cores(tmp_path / "c", "0::/elsewhere\n", {"cpu.max": "100000 100000\n"}) == 1


def test_a_v2_max_is_no_quota_whatever_v1_files_say(tmp_path: Path) -> None:
    files = {
        "cpu.max": "max 100000\n",
        "cpu/cpu.cfs_quota_us": "50000",
        "cpu/cpu.cfs_period_us": "100000",
    }
    assert cores(tmp_path, "0::/\n", files) == AFFINITY


@pytest.mark.parametrize(
    ("quota", "period", "expected"), [("-1", "100000", None), ("200000", "100000", 2)]
)
def test_a_cgroup_v1_quota_caps_the_usable_cores(
    tmp_path: Path, quota: str, period: str, expected: int | None
) -> None:
    files = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": period,
    }
    found = cores(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n", files)
    assert found == (AFFINITY if expected is None else min(AFFINITY, expected))


def test_unreadable_or_odd_cgroup_files_leave_the_affinity(tmp_path: Path) -> None:
    assert cores(tmp_path / "a", "0::/\n", {"cpu.max": "a lot\n"}) == AFFINITY
    zero = {"cpu/cpu.cfs_quota_us": "0", "cpu/cpu.cfs_period_us": "0"}
    assert cores(tmp_path / "b", "2:cpu:/\n", zero) == AFFINITY
    assert usable_cores(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none") == AFFINITY


@pytest.mark.parametrize(
    ("cores", "workers"), [(1, 1), (2, 2), (3, 3), (4, 4), (16, MAX_DEFAULT_WORKERS)]
)
def test_workers_is_one_per_core_at_most_four(cores: int, workers: int) -> None:
    assert default_workers(cores) == workers


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is needed")
@pytest.mark.parametrize(("cpus", "how"), [(1, "unset"), (2, "unset"), (1, "--workers auto")])
async def test_sluice_serve_chooses_its_workers_from_the_cores_it_may_use(
    tmp_path: Path, cpus: int, how: str
) -> None:
    """With ``workers`` unset, ``sluice serve`` pinned to one core runs one process; on two,
    two transport processes in front of the engine. ``--workers auto`` asks for the same
    choice over a number the environment sets."""
    if cpus > AFFINITY:
        pytest.skip(f"this machine lets the tests use {AFFINITY} core(s)")
    allowed = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:cpus])
    command = ("taskset", "-c", allowed, sys.executable, "-m", "sluice")
    args, env = ((), {}) if how == "unset" else (("--workers", "auto"), {"SLUICE_WORKERS": "3"})
    unset = ["SLUICE_WORKERS"] if how == "unset" else []
    async with serve_process(*args, command=command, cwd=tmp_path, env=env, unset=unset) as server:
        chosen = await server.wait_for(CHOSEN.pattern)
        await server.wait_for("ready: serving")
        usable = min(cpus, usable_cores())  # a container's CPU quota may allow fewer
        assert (int(chosen.group(1)), int(chosen.group(2))) == (default_workers(usable), usable)
        assert await server.stop() == 0
    transports = "transport process" in server.log
    assert transports == (default_workers(min(cpus, usable_cores())) > 1), server.log
