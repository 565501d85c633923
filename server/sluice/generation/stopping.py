"""Stop sequences, matched on the decoded text as it streams.

Text that could be the start of a stop sequence is held back until the next piece shows
whether it is one, so the stop text itself is never sent, even when it spans tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopSequences:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add decoded text: the part that is safe to send now, and whether a stop sequence
        has appeared (then the text before it is all that remains to send)."""
        pending = self._held + text
        found = [index for stop in self._stops if (index := pending.find(stop)) >= 0]
        if found:
            self._held = ""
            return pending[: min(found)], True
        hold = self._longest_partial(pending)
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """The held-back text, once the generation ended for another reason."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - size :]):
                    longest = size
                    break
        return longest
