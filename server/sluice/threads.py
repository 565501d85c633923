"""Waiting for threads from the event loop, never for ever."""

from __future__ import annotations

import asyncio
import logging
import threading

JOIN_TIMEOUT_S = 10.0
"""Longest a close waits for one backend thread to finish its work and stop."""

log = logging.getLogger(__name__)


async def join_thread(thread: threading.Thread, timeout_s: float = JOIN_TIMEOUT_S) -> bool:
    """Wait (without blocking the event loop, and at most ``timeout_s``) for ``thread`` to
    end; False, logged, when it is still running (hung)."""
    await asyncio.to_thread(thread.join, timeout_s)
    if thread.is_alive():
        log.warning(
            "thread %s is still busy after %.0fs; leaving it behind", thread.name, timeout_s
        )
        return False
    return True
