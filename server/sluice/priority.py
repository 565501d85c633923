"""Urgency classes: which priority level a request has, and what a level may do.

A request names its level with Triton's ``priority`` request parameter (1 is the highest;
0 means the default level) or with the ``x-sluice-priority`` metadata (a level number or a
class name such as ``interactive`` or ``batch``, mapped in ``priority.classes``). Then

* queues (the dynamic batcher's, the generation scheduler's) take the most urgent request
  first, oldest first within a level, and a request that has waited ``max_age_ms`` counts
  as the highest level, so no level starves (``rank``);
* each level may have its own queue bound and queue timeout (``queue_policy``);
* admission keeps part of the in-flight limit from each level below the default, so an
  overloaded server sheds the lowest levels first, while a server whose calls all have the
  default level (or higher) admits exactly as without priorities (``admission_limit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.errors import InvalidInputError
from sluice.settings import PrioritySettings

MAX_PRIORITY_CHARS = 64
"""Longest priority value a caller may send (it appears in error messages)."""


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """One level's own queue bound and queue timeout (None: none of its own)."""

    max_queue_size: int | None = None
    timeout_s: float | None = None


class Priorities:
    def __init__(self, settings: PrioritySettings | None = None) -> None:
        self._settings = settings or PrioritySettings()
        self.levels = self._settings.levels
        self.default_level = self._settings.default_level
        self.metadata_key = self._settings.metadata_key
        self._max_age_s = self._settings.max_age_ms / 1000
        self._policies = {
            level: QueuePolicy(
                policy.max_queue_size,
                None if policy.default_timeout_ms is None else policy.default_timeout_ms / 1000,
            )
            for level, policy in self._settings.queue_policies.items()
        }

    # -- what a request names ------------------------------------------------------------

    def resolve(self, *, parameter: int | None = None, metadata: str = "") -> int:
        """The request's level: its ``priority`` parameter when set (not 0), else its
        metadata, else the default level. ``InvalidInputError`` names the valid values."""
        if parameter is not None and parameter != 0:
            return self._check(parameter, "parameter 'priority'")
        if metadata:
            return self._from_metadata(metadata)
        return self.default_level

    def level(self, level: int) -> int:
        """A level as queues use it: 0 (not given) is the default level."""
        return level if 1 <= level <= self.levels else self.default_level

    def _from_metadata(self, value: str) -> int:
        text = value.strip()
        if text in self._settings.classes:
            return self._settings.classes[text]
        if text.isascii() and text.isdigit() and len(text) <= MAX_PRIORITY_CHARS:
            number = int(text)
            return self.default_level if number == 0 else self._check(number, self._where)
        shown = text if len(text) <= MAX_PRIORITY_CHARS else f"{text[:MAX_PRIORITY_CHARS]}..."
        raise InvalidInputError(
            f"{self._where} is {shown!r}, which is neither a level nor a class: send a level "
            f"from 1 (highest) to {self.levels} or one of the classes {self._classes()}"
        )

    def _check(self, level: int, where: str) -> int:
        if not 1 <= level <= self.levels:
            raise InvalidInputError(
                f"{where} is {level}: priority levels run from 1 (highest) to {self.levels} "
                f"(0: the default, {self.default_level}); classes: {self._classes()}"
            )
        return level

    @property
    def _where(self) -> str:
        return f"metadata '{self.metadata_key}'"

    def _classes(self) -> str:
        classes = sorted(self._settings.classes.items())
        return ", ".join(f"{name}={level}" for name, level in classes)

    # -- what a level may do ------------------------------------------------------------

    def rank(self, level: int, waited_s: float) -> int:
        """The level a queued request counts as after waiting ``waited_s``: its own, or the
        highest once it has waited ``max_age_ms`` (no starvation)."""
        return 1 if waited_s >= self._max_age_s else self.level(level)

    def queue_policy(self, level: int) -> QueuePolicy:
        return self._policies.get(self.level(level), QueuePolicy())

    def admission_limit(self, level: int, limit: int) -> int:
        """How much of an in-flight ``limit`` calls of ``level`` may fill (at least 1)."""
        below_default = max(0, self.level(level) - self.default_level)
        share = 1 - below_default * self._settings.admission_reserve_per_level
        return max(1, int(limit * share))
