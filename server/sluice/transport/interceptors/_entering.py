"""An ``around`` hook for concerns that act only as a call enters."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


class Entering:
    """Runs ``work`` as the call enters; nothing as it leaves. (A plain class rather than a
    generator-based context manager: every call goes through several hooks.)"""

    __slots__ = ("_work",)

    def __init__(self, work: Coroutine[Any, Any, None]) -> None:
        self._work = work

    async def __aenter__(self) -> None:
        await self._work

    async def __aexit__(self, *exc: object) -> None:
        return None
