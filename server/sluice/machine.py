"""Facts about the machine the server runs on, for defaults derived from it."""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def available_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


MAX_DEFAULT_WORKERS = 4
"""The most transport processes ``workers`` chooses by itself. Every call also runs on the
one engine's event loop (interceptors, routing, batching: about twice a transport's work
per call, docs/workers.md), so past a few transports the engine is the limit and more of
them only take cores from the models; four leave room for TLS, which the transports pay."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cores(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may use: those it may run on, or the CPU quota of its cgroup
    or of any cgroup above it, if lower (cgroup v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cpu_quota(cgroup_root, _memberships(proc_cgroup))
    if quota is not None:
        cores = min(cores or quota, quota)
    return max(1, cores or 1)


def default_workers(cores: int | None = None) -> int:
    """``workers`` when it is not set: one process on one core, else one transport process
    per usable core, at most ``MAX_DEFAULT_WORKERS``."""
    cores = usable_cores() if cores is None else cores
    return 1 if cores <= 1 else min(cores, MAX_DEFAULT_WORKERS)


def _memberships(proc_cgroup: Path) -> dict[str, str]:
    """The process's cgroup path per hierarchy: ``""`` for v2's unified one, a v1
    hierarchy's controllers (``cpu,cpuacct``) for the others."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        found[controllers] = path
    return found


def _cpu_quota(root: Path, memberships: dict[str, str]) -> int | None:
    """The lowest quota on the way from the process's cgroup up to the root, in whole CPUs;
    None without any. A cgroup path that is not under ``root`` (another cgroup namespace)
    leaves the root alone to read."""
    quotas = [
        quota
        for folder in _upwards(root, memberships.get("", "/"))
        if (quota := _v2_quota(folder / "cpu.max")) is not None
    ]
    for controllers, path in memberships.items():
        if "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu"):
                quotas += [
                    quota
                    for folder in _upwards(mount, path)
                    if (quota := _v1_quota(folder)) is not None
                ]
    return min(quotas, default=None)


def _upwards(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each folder above it up to ``mount`` (just ``mount`` when the
    path is not there)."""
    leaf = mount / path.strip("/")
    if not leaf.is_dir():
        return [mount]
    folders = [leaf]
    while folders[-1] != mount and mount in folders[-1].parents:
        folders.append(folders[-1].parent)
    return folders


def _v2_quota(path: Path) -> int | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _whole_cpus(fields[0], fields[1])


def _v1_quota(folder: Path) -> int | None:
    try:
        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
        period = (folder / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _whole_cpus(quota, period)


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 says -1 for "no quota"
        return None
    return max(1, -(-quota_us // period_us))
