"""The clocks Sluice is given (never reads the time itself where a clock can be injected).

Timeouts, deadlines, queue waits and breaker timing run on a ``Clock``: monotonic seconds
(``time.monotonic`` in the server; tests pass one they move by hand). Only what must mean
the same across restarts or replicas (a breaker's opening time in a shared store) uses a
``WallClock``: seconds since the epoch (``time.time``).
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds: the time base of every timeout and deadline."""

WallClock = Callable[[], float]
"""Seconds since the epoch (``time.time``), for state that outlives the process."""
