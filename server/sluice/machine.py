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

_CGROUP_V2_CPU = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def usable_cores(*, cgroup_v2: Path = _CGROUP_V2_CPU, cgroup_v1: Path = _CGROUP_V1_CPU) -> int:
    """The CPUs this process may use: those it may run on, or its container's CPU quota
    (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) if lower,
    rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cpu_quota(cgroup_v2, cgroup_v1)
    if quota is not None:
        cores = min(cores or quota, quota)
    return max(1, cores or 1)


def default_workers(cores: int | None = None) -> int:
    """``workers`` when it is not set: one process on one core, else one transport process
    per usable core, at most ``MAX_DEFAULT_WORKERS``."""
    cores = usable_cores() if cores is None else cores
    return 1 if cores <= 1 else min(cores, MAX_DEFAULT_WORKERS)


def _cpu_quota(cgroup_v2: Path, cgroup_v1: Path) -> int | None:
    """Whole CPUs the container's quota allows (rounded up), or None without a quota."""
    try:
        fields = cgroup_v2.read_text().split()
    except OSError:
        fields = []
    if len(fields) == 2 and fields[0] != "max":
        return _whole_cpus(fields[0], fields[1])
    try:
        quota = (cgroup_v1 / "cpu.cfs_quota_us").read_text().strip()
        period = (cgroup_v1 / "cpu.cfs_period_us").read_text().strip()
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
