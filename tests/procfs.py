"""What /proc says about a process the tests started: its children (a server's transport
processes), its memory, its CPU time and whether it still runs."""

from __future__ import annotations

import os
import re
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    field 3 of proc(5) (the state) is index 0."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid``, whichever of its threads started
    them."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int(_stat_fields(proc.name)[1])
            except OSError:  # it ended while we looked
                continue
            if parent == pid:
                found.append(int(proc.name))
    return found


def status_bytes(key: str, pid: int | str = "self") -> int:
    """A /proc/<pid>/status size in bytes (``VmRSS``, ``VmHWM``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, text
    return int(match.group(1)) * 1024


def environment(pid: int) -> dict[str, str]:
    """The environment the process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of the whole process so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except FileNotFoundError:
        return False
