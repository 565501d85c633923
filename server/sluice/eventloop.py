"""The event loop each Sluice process runs on (setting ``event_loop``).

``auto`` (the default) is uvloop where it is installed (it is a dependency on every
platform it supports), else asyncio's own loop. uvloop runs the loop's own work (ready
callbacks, timers, socket reads and writes, cross-thread wake-ups) in C; grpc.aio's calls
are mostly that work, so the transports and the engine spend less CPU per call on it
(bench/README.md, "Event loop"). ``asyncio`` keeps the standard loop (for a debugger or
profiler that needs it); ``uvloop`` insists, and the server refuses to start without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from sluice.errors import ConfigError

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: EventLoopChoice) -> LoopFactory:
    """What makes the loop ``choice`` asks for (never the policy's: that is global state a
    library may have changed)."""
    if choice == "asyncio":
        return asyncio.SelectorEventLoop
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop is uvloop, but uvloop is not installed here: "
                "pip install uvloop, or set event_loop to auto or asyncio"
            ) from exc
        return asyncio.SelectorEventLoop
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``, for the log."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
