"""Deadline budgets: a default when the client sent none, a cap, and early rejection."""

from __future__ import annotations

from sluice.clock import Clock
from sluice.errors import DeadlineExceededError
from sluice.settings import DeadlineSettings


class DeadlinePolicy:
    def __init__(self, settings: DeadlineSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock

    def budget_s(self, client_remaining_s: float | None, timeout_s: float | None = None) -> float:
        """Seconds this call may take: the tightest of client deadline, timeout and cap."""
        candidates = [self._settings.max_deadline_s]
        candidates.append(
            self._settings.default_deadline_s if client_remaining_s is None else client_remaining_s
        )
        if timeout_s is not None and timeout_s > 0:
            candidates.append(timeout_s)
        budget = min(candidates)
        if budget <= 0:
            raise DeadlineExceededError(
                "the call's deadline had already passed when it reached the server"
            )
        return budget

    def deadline(self, budget_s: float) -> float:
        """The absolute deadline on the service clock for a budget starting now."""
        return self._clock() + budget_s
