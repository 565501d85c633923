"""What each model serves, and the history of how it got there, on disk.

Per model, in the state directory:

* ``<model>/history.jsonl``: append-only, one JSON object per line (``seq``, time, action,
  from, to, who, reason), each append flushed and fsync'd before the change takes effect;
* ``<model>/serving.json``: the serving pointer (serving version, the stack of versions a
  rollback returns to, and the ``seq`` of the last change applied), replaced atomically:
  written to a temporary file, fsync'd, renamed over the old one, directory fsync'd.

A change is appended to the history first, then the pointer is replaced. Whatever a crash
interrupts, ``open`` restores a state that is either the old one or the new one:

* history ahead of the pointer (crash between the two writes): the change is rolled
  forward from its history entry;
* pointer ahead of the history (a history write lost): the change the pointer records is
  appended to the history;
* a torn last history line (crash inside an append): dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sluice.files import write_atomically

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
POINTER_FILE = "serving.json"

SERVER = "sluice"
"""Who the history names for a change the server makes itself (a model's first serving
version, a failed serving version replaced)."""


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    time: str
    action: str
    """load, unload, promote, rollback, load_failed."""
    from_version: str
    to_version: str
    who: str
    reason: str


@dataclass(slots=True)
class Pointer:
    serving: str = ""
    """The version calls without a version get ("" : none chosen yet)."""
    previous: list[str] = field(default_factory=list)
    """Versions that served before, most recent last (a rollback pops one)."""
    seq: int = 0
    last: Change | None = None

    def apply(self, change: Change) -> None:
        """The pointer after ``change`` (only promote and rollback move it)."""
        if change.action == "promote":
            if self.serving and self.serving != change.to_version:
                self.previous.append(self.serving)
            self.serving = change.to_version
        elif change.action == "rollback":
            if self.previous:
                self.previous.pop()
            self.serving = change.to_version
        self.seq = change.seq
        self.last = change


class ModelState:
    """One model's pointer and history; ``directory`` None keeps both in memory only."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self.pointer = Pointer()
        self._history: list[Change] = []

    @classmethod
    def open(cls, directory: Path | None) -> ModelState:
        state = cls(directory)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            state._history = _read_history(directory / HISTORY_FILE)
            state.pointer = _read_pointer(directory / POINTER_FILE)
            state._recover()
        return state

    @property
    def history(self) -> list[Change]:
        return list(self._history)

    def record(
        self, action: str, *, from_version: str, to_version: str, who: str, reason: str
    ) -> Change:
        """Append a change to the history, then move the pointer (see the module doc)."""
        change = Change(
            seq=max(self.pointer.seq, self._history[-1].seq if self._history else 0) + 1,
            time=utc_now(),
            action=action,
            from_version=from_version,
            to_version=to_version,
            who=who,
            reason=reason,
        )
        self._append(change)
        self.pointer.apply(change)
        self._write_pointer()
        return change

    def _recover(self) -> None:
        last_seq = self._history[-1].seq if self._history else 0
        if last_seq > self.pointer.seq:
            for change in self._history:
                if change.seq > self.pointer.seq:
                    log.warning(
                        "%s: rolling forward change %d (%s)",
                        self._directory,
                        change.seq,
                        change.action,
                    )
                    self.pointer.apply(change)
            self._write_pointer()
        elif self.pointer.seq > last_seq and self.pointer.last is not None:
            log.warning(
                "%s: restoring history entry %d from the pointer", self._directory, self.pointer.seq
            )
            self._append(self.pointer.last)

    def _append(self, change: Change) -> None:
        self._history.append(change)
        if self._directory is None:
            return
        line = json.dumps(asdict(change), separators=(",", ":")) + "\n"
        with (self._directory / HISTORY_FILE).open("a", encoding="utf-8") as history:
            history.write(line)
            history.flush()
            os.fsync(history.fileno())

    def _write_pointer(self) -> None:
        if self._directory is None:
            return
        data = pointer_to_dict(self.pointer)
        write_atomically(
            self._directory / POINTER_FILE, (json.dumps(data, indent=2) + "\n").encode()
        )


def _read_history(path: Path) -> list[Change]:
    if not path.is_file():
        return []
    changes: list[Change] = []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn:
        log.warning("%s: dropping a torn last line (a crash during an append)", path)
        with path.open("r+", encoding="utf-8") as history:
            history.truncate(len(text.encode("utf-8")) - len(torn.encode("utf-8")))
    for number, line in enumerate(complete, 1):
        if line.strip():
            changes.append(change_from_dict(json.loads(line), f"{path}:{number}"))
    return changes


def _read_pointer(path: Path) -> Pointer:
    if not path.is_file():
        return Pointer()
    return pointer_from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def utc_now() -> str:
    """The time a change is recorded, as ISO 8601 UTC to the millisecond."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pointer_to_dict(pointer: Pointer) -> dict[str, Any]:
    return {
        "serving": pointer.serving,
        "previous": pointer.previous,
        "seq": pointer.seq,
        "last": asdict(pointer.last) if pointer.last else None,
    }


def pointer_from_dict(raw: dict[str, Any], where: str) -> Pointer:
    last = raw.get("last")
    return Pointer(
        serving=str(raw.get("serving", "")),
        previous=[str(v) for v in raw.get("previous", [])],
        seq=int(raw.get("seq", 0)),
        last=change_from_dict(last, where) if last else None,
    )


def change_from_dict(raw: dict[str, Any], where: str) -> Change:
    try:
        return Change(**{name: raw[name] for name in Change.__dataclass_fields__})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a history entry: {exc}") from exc
