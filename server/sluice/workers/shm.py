"""Large messages cross the lane through shared memory instead of the socket.

The sender writes the message into a new file in ``/dev/shm`` (one system call, no
mapping) and sends its name in the frame where the message would be; the receiver opens
it, removes its name at once (whatever happens next, nothing is left behind), and maps it
read-only: the engine's handler parses the request straight from the mapping, with no
copy through the socket on the engine's event loop. The mapping goes when its last view
does.

The engine and its transports run as one user: a file is readable by its owner only.
Names are made here and checked on receipt (``sluice-lane-<pid>-`` and hex only), so a
frame can never name another file. A sender whose frame may not have been read (the
connection closed) removes the file itself; removing it twice is harmless. A sender that
dies first cannot: its names carry its pid, and the engine removes what a transport left
once that transport has exited (``sweep``), and at start what any dead sender left.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"sluice-lane-(\d{1,10})-[0-9a-f]{32}")


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def write(data: bytes | bytearray | memoryview) -> str:
    """A new shared file holding ``data`` (owner-only); its name."""
    name = f"sluice-lane-{os.getpid()}-{secrets.token_hex(16)}"
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        remove(name)
        raise
    finally:
        os.close(fd)
    return name


def take(name: str, max_bytes: int) -> memoryview:
    """Map the shared file ``name`` read-only and remove its name. ``ValueError`` when the
    name is not one of ours or the file holds more than ``max_bytes``; ``OSError`` when it
    cannot be opened."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a lane shared-memory name: {name[:80]!r}")
    fd = os.open(SHM_DIR / name, os.O_RDONLY)
    try:
        remove(name)
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise ValueError(f"Received message larger than max ({size} vs. {max_bytes})")
        if size == 0:
            return memoryview(b"")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return memoryview(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def remove(name: str) -> None:
    if _NAME.fullmatch(name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / name)


def sweep(pid: int | None = None) -> int:
    """Remove the shared files a sender left: those of process ``pid`` (it has exited), or
    with None those of every sender that no longer runs. How many were removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for path in SHM_DIR.iterdir():
            found = _NAME.fullmatch(path.name)
            if found is None:
                continue
            owner = int(found.group(1))
            if owner == pid or (pid is None and not _running(owner)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True
