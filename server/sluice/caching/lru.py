"""A least-recently-used store bounded in bytes.

Each entry's size is counted when it is stored (its tensors, what a BYTES element costs as
a Python object, and a fixed cost per entry); the sum never passes ``max_bytes``: storing
evicts the least recently used entries first, and an entry larger than ``max_entry_bytes``
(or the whole budget) is never stored. Reads and writes take a lock, so threads may share
it; nothing inside waits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sluice.domain import OutputTensor

ENTRY_OVERHEAD_BYTES = 512
"""What one entry costs beyond its tensors: its key, the entry and array objects."""
BYTES_ELEMENT_OVERHEAD = 64
"""What one BYTES element costs beyond its contents (a Python bytes object and the array's
pointer to it)."""


@dataclass(frozen=True, slots=True)
class Cached:
    """One kept answer: who computed it and its outputs (read-only arrays, owned)."""

    model: str
    version: str
    backend: str
    outputs: tuple[OutputTensor, ...]
    nbytes: int


def entry_bytes(outputs: Sequence[OutputTensor]) -> int:
    """What keeping ``outputs`` costs, as the budget counts it."""
    total = ENTRY_OVERHEAD_BYTES
    for output in outputs:
        array = output.array
        if array.dtype == object:
            total += array.size * BYTES_ELEMENT_OVERHEAD + sum(map(len, array.reshape(-1)))
        else:
            total += array.nbytes
    return total


class ByteLRU:
    def __init__(
        self,
        *,
        max_bytes: int,
        max_entry_bytes: int,
        on_evict: Callable[[Cached], None] | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._on_evict = on_evict
        self._entries: OrderedDict[bytes, Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Bytes the entries take, as the budget counts them."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` may be stored at all."""
        return nbytes <= self._max_entry_bytes

    def get(self, digest: bytes) -> Cached | None:
        """The entry stored under ``digest`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: bytes, entry: Cached) -> bool:
        """Store ``entry`` (replacing what ``digest`` held), evicting the least recently
        used entries until it fits; False when it is too large to keep."""
        if not self.fits(entry.nbytes):
            return False
        evicted: list[Cached] = []
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self._max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
                evicted.append(dropped)
            self._entries[digest] = entry
            self._bytes += entry.nbytes
        if self._on_evict is not None:
            for dropped in evicted:
                self._on_evict(dropped)
        return True
