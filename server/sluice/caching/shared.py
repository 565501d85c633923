"""Answers shared by replicas through Redis (``cache.redis_url``): a second level behind
each replica's own LRU. A lookup the local store misses asks Redis, bounded by
``cache.redis_timeout_s``; a kept answer is written there in the background (at most
``MAX_PENDING_WRITES`` at once; more are skipped), to expire after ``cache.redis_ttl_s``.
Redis that cannot be reached, answers slowly or holds a malformed entry costs a miss,
never a failed call; each such failure counts in ``sluice_cache_shared_errors_total``
and is logged once until Redis answers again. How much Redis keeps is Redis's own
``maxmemory`` (with an LRU eviction policy)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sluice.caching.codec import decode, encode
from sluice.caching.lru import Cached
from sluice.errors import ConfigError
from sluice.metrics import Metrics
from sluice.settings import CacheSettings

log = logging.getLogger(__name__)

MAX_PENDING_WRITES = 64
PREFIX = "sluice:cache:"


class SharedResponses:
    def __init__(
        self, client: Any, *, settings: CacheSettings, errors: type[Exception], metrics: Metrics
    ) -> None:
        self._client = client
        self._timeout_s = settings.redis_timeout_s
        self._ttl_ms = max(1, int(settings.redis_ttl_s * 1000))
        self._max_entry_bytes = settings.max_entry_bytes
        self._errors = errors
        self._metrics = metrics
        self._writes: set[asyncio.Task[None]] = set()
        self._failing = False

    @classmethod
    def connect(cls, settings: CacheSettings, *, metrics: Metrics) -> SharedResponses:
        """The shared store ``cache.redis_url`` names; the ``redis`` package is imported
        only here."""
        try:
            import redis.asyncio  # type: ignore[import-not-found, unused-ignore]
            from redis import RedisError  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise ConfigError(
                "cache.redis_url is set but the 'redis' package is not installed; install it "
                "(pip install redis) or leave cache.redis_url unset"
            ) from exc
        assert settings.redis_url is not None
        timeout_s = settings.redis_timeout_s
        try:
            client = redis.asyncio.Redis.from_url(
                settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        except ValueError as exc:
            raise ConfigError(f"cache.redis_url is not a Redis URL: {exc}") from exc
        return cls(client, settings=settings, errors=RedisError, metrics=metrics)

    async def get(self, digest: bytes) -> Cached | None:
        """The entry another replica (or this one) shared under ``digest``, or None."""
        try:
            async with asyncio.timeout(self._timeout_s):
                blob = await self._client.get(PREFIX + digest.hex())
        except (TimeoutError, OSError, self._errors) as exc:
            self._failed("read", exc)
            return None
        self._answered()
        if blob is None:
            return None
        try:
            return decode(bytes(blob), max_entry_bytes=self._max_entry_bytes)
        except (ValueError, UnicodeDecodeError) as exc:
            self._failed("decode", exc)
            return None

    def put(self, digest: bytes, entry: Cached) -> None:
        """Share ``entry`` in the background (skipped when too many writes are pending)."""
        if len(self._writes) >= MAX_PENDING_WRITES:
            self._metrics.cache_shared_errors.labels("busy").inc()
            return
        task = asyncio.get_running_loop().create_task(self._write(digest, entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self._client.aclose()

    async def _write(self, digest: bytes, entry: Cached) -> None:
        blob = await asyncio.to_thread(encode, entry)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.set(PREFIX + digest.hex(), blob, px=self._ttl_ms)
        except (TimeoutError, OSError, self._errors) as exc:
            self._failed("write", exc)
            return
        self._answered()

    def _failed(self, what: str, exc: BaseException) -> None:
        self._metrics.cache_shared_errors.labels(what).inc()
        if not self._failing:
            log.warning("response cache: Redis %s failed (%s); calls go on without it", what, exc)
        self._failing = what != "decode"

    def _answered(self) -> None:
        if self._failing:
            log.info("response cache: Redis answers again")
        self._failing = False
