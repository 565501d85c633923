"""The response cache as the router uses it: keys for a request on a loaded version,
lookups and stores counted in the metrics and in the version's statistics.

One cache serves the whole server, bounded by ``cache.max_bytes``; a model takes part when
its config asks (``response_cache`` or ``degraded.from_cache``). Only successful answers
of the version the key names are stored, as read-only copies (never views that would
keep a whole batch's outputs alive beyond what the budget counts).
"""

from __future__ import annotations

import asyncio
import weakref

import numpy as np

from sluice.caching.keys import CacheKey, generation_key, request_key, version_identity
from sluice.caching.lru import ByteLRU, Cached, entry_bytes
from sluice.caching.shared import SharedResponses
from sluice.clock import Clock
from sluice.domain import GenerationRequest, InferRequest, InferResult, OutputTensor
from sluice.loader import ModelVersion
from sluice.metrics import Metrics
from sluice.settings import CacheSettings
from sluice.tensors import Array

OFF_LOOP_KEY_BYTES = 256 * 1024
"""Requests carrying more tensor bytes than this are hashed in a worker thread."""


class ResponseCache:
    def __init__(self, settings: CacheSettings, *, metrics: Metrics, clock: Clock) -> None:
        self._metrics = metrics
        self._clock = clock
        self._lru = ByteLRU(
            max_bytes=settings.max_bytes,
            max_entry_bytes=settings.max_entry_bytes,
            on_evict=self._evicted,
        )
        self._enabled = settings.max_bytes > 0
        self._shared = (
            SharedResponses.connect(settings, metrics=metrics)
            if self._enabled and settings.redis_url is not None
            else None
        )
        self._identities: weakref.WeakKeyDictionary[ModelVersion, bytes] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def enabled(self) -> bool:
        """False when ``cache.max_bytes`` is 0: nothing is looked up or stored."""
        return self._enabled

    @property
    def size_bytes(self) -> int:
        return self._lru.size_bytes

    async def key(
        self, request: InferRequest, model: ModelVersion, wanted: list[str], *, payload_bytes: int
    ) -> CacheKey:
        """The key of a request validated against ``model``'s inputs."""
        identity = await self._identity(model)
        if payload_bytes <= OFF_LOOP_KEY_BYTES:
            return request_key(request, spec=model.spec, identity=identity, wanted=wanted)
        return await asyncio.to_thread(
            request_key, request, spec=model.spec, identity=identity, wanted=wanted
        )

    async def generation_key(self, request: GenerationRequest, model: ModelVersion) -> CacheKey:
        """The key of a greedy generation on ``model``."""
        return generation_key(request, spec=model.spec, identity=await self._identity(model))

    async def _identity(self, model: ModelVersion) -> bytes:
        identity = self._identities.get(model)
        if identity is None:
            # Shared by replicas, a version is named by its files' contents (read once).
            content = self._shared is not None
            identity = await asyncio.to_thread(version_identity, model.spec, content=content)
            self._identities[model] = identity
        return identity

    async def lookup(self, key: CacheKey, model: ModelVersion) -> Cached | None:
        """The answer kept under ``key``, here or shared by a replica (counted as a hit or
        a miss of ``model``)."""
        started = self._clock()
        entry = _named(key, self._lru.get(key.digest))
        if entry is None and self._shared is not None:
            entry = _named(key, await self._shared.get(key.digest))
            if entry is not None:
                self._keep(key, entry)
        seconds = self._clock() - started
        if entry is None:
            model.stats.record_cache_miss(seconds)
            self._metrics.cache_misses.labels(key.model).inc()
        else:
            model.stats.record_cache_hit(seconds)
            self._metrics.cache_hits.labels(key.model).inc()
        return entry

    def store(self, key: CacheKey, result: InferResult, model: ModelVersion) -> bool:
        """Keep ``result`` under ``key`` when the version the key names computed it and it
        fits; False when it was not kept."""
        spec = model.spec
        if (result.model, result.version, result.backend) != (
            spec.name,
            spec.version,
            spec.backend,
        ):
            return False
        nbytes = entry_bytes(result.outputs)
        if not self._lru.fits(nbytes):
            return False
        started = self._clock()
        outputs = tuple(
            OutputTensor(output.name, output.datatype, _owned(output.array))
            for output in result.outputs
        )
        entry = Cached(spec.name, spec.version, spec.backend, outputs, nbytes)
        kept = self._keep(key, entry)
        if self._shared is not None:
            self._shared.put(key.digest, entry)
        model.stats.record_cache_insert(self._clock() - started)
        return kept

    async def close(self) -> None:
        """Stop sharing (pending writes are dropped)."""
        if self._shared is not None:
            await self._shared.close()

    def _keep(self, key: CacheKey, entry: Cached) -> bool:
        kept = self._lru.put(key.digest, entry)
        self._metrics.cache_bytes.set(self._lru.size_bytes)
        self._metrics.cache_entries.set(len(self._lru))
        return kept

    def _evicted(self, entry: Cached) -> None:
        self._metrics.cache_evictions.labels(entry.model).inc()


def _named(key: CacheKey, entry: Cached | None) -> Cached | None:
    """``entry`` if it is the answer of the model and version the key names: never another
    model's, whatever the digest says."""
    if entry is None or (entry.model, entry.version) != (key.model, key.version):
        return None
    return entry


def _owned(array: Array) -> Array:
    """A read-only copy that owns its memory."""
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy
