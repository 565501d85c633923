"""The response cache: answers kept by a key over everything that decides them, in a
byte-bounded LRU (``lru``), keyed as ``keys`` says, served by ``ResponseCache``."""

from sluice.caching.keys import CacheKey
from sluice.caching.lru import ByteLRU, Cached
from sluice.caching.responses import ResponseCache

__all__ = ["ByteLRU", "CacheKey", "Cached", "ResponseCache"]
