"""One ``sluice serve`` per port on a machine, with transport processes too.

The transports bind the public port with ``SO_REUSEPORT`` so that they can share it, and
the kernel lets any other process of the same user bind it the same way: a second
``sluice serve --grpc-port P`` would start and take part of the first one's connections
(a single process fails with "address in use"). The engine therefore holds an exclusive
``flock`` on a file named after the port and the network namespace (ports are per
namespace: replicas in namespaces of their own all serve 8001), in the temporary
directory, while it serves: a second server on the port fails at start, naming the first
one's pid. Another user's
server cannot share the port at all (the kernel refuses ``SO_REUSEPORT`` across users), so
a lock file this user may not open is left to the kernel's check.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


class PortTakenError(OSError):
    """Another ``sluice serve`` on this machine serves the port."""


class PortLock:
    """The held lock on ``port``; ``release`` (or the process's exit) lets it go."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def take(cls, port: int, folder: Path | None = None) -> PortLock:
        name = f"sluice-port-{_network_namespace()}-{port}.lock"
        path = (folder or Path(tempfile.gettempdir())) / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:  # another user's: the kernel keeps their port from us
            return cls(None, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PortTakenError(
                f"port {port} is served by another sluice serve on this machine (pid "
                f"{holder}; lock {path}); stop it or choose another grpc_port"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None


def _network_namespace() -> str:
    """This process's network namespace (its inode), or "host" where that is not known."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "host"
