"""Answers the router gives without running a model: hits of the response cache, and a
model's degraded tier once every candidate of its chain failed or is open.

A call to a model whose config asks for either is validated against the version its name
resolves to before anything else (``prepare``), and keyed when its answers are cached. A hit
answers at once (the batch queue, the executor and the breakers never see it). A call the
chain cannot answer gets, when the model's ``degraded`` config says so, the cached answer
of the same request (``from_cache``), else its static answer; either is marked in the
response (``sluice-degraded`` trailing metadata and the ``sluice_degraded`` parameter),
counted in ``sluice_degraded_responses_total``, logged, and recorded on a span.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from sluice import logs
from sluice.answer_config import DegradedConfig
from sluice.caching import CacheKey, ResponseCache
from sluice.dataplane import Generation
from sluice.domain import (
    Call,
    Chunk,
    FinishReason,
    GenerationRequest,
    InferRequest,
    InferResult,
    OutputTensor,
    Routing,
)
from sluice.errors import SluiceError
from sluice.loader import ModelVersion
from sluice.metrics import Metrics
from sluice.registry.table import ModelTable
from sluice.routing.generations import (
    RecordedGeneration,
    ReplayedGeneration,
    Served,
    StaticGeneration,
)
from sluice.tensors import Array, check_inputs, check_requested_outputs, reply_size
from sluice.tracing import Tracing

log = logging.getLogger(__name__)

CACHE = "cache"
STATIC = "static"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call to a model with a cache or a degraded tier, validated and keyed."""

    model: ModelVersion
    """The version the called name resolves to (the key names it)."""
    wanted: list[str]
    rows: int
    key: CacheKey | None
    """None: this call's answers are not cached."""
    reads: bool
    """Normal traffic reads the cache (``response_cache.enabled``)."""
    degraded: DegradedConfig | None


@dataclass(frozen=True, slots=True)
class KeyedGeneration:
    """A greedy generation whose answer is kept in the response cache."""

    key: CacheKey
    model: ModelVersion
    """The version the called name resolves to (the key names it)."""
    reads: bool
    """Normal traffic reads the cache (``response_cache.generations``); else only the
    degraded tier does (``degraded.from_cache``)."""


class Answers:
    def __init__(
        self,
        table: ModelTable,
        cache: ResponseCache,
        *,
        aliases: Iterable[str],
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self._table = table
        self._cache = cache
        self._aliases = frozenset(aliases)
        self._metrics = metrics
        self._tracing = tracing

    def stands_in(self, name: str) -> bool:
        """Whether calls to ``name`` may be answered with no backend able to run them (so
        the breaker check before queueing must let them through)."""
        if name in self._aliases:
            return False
        cached = self._cache.enabled and self._table.response_cache(name).enabled
        return cached or self._table.degraded(name) is not None

    async def prepare(self, request: InferRequest) -> Prepared | None:
        """The call validated and keyed, when its model caches or degrades (else None)."""
        if request.model in self._aliases or request.backend:
            return None
        reads = self._table.response_cache(request.model).enabled
        degraded = self._table.degraded(request.model)
        if not reads and degraded is None:
            return None
        try:
            model = self._table.get(request.model, request.version, healthy=False)
        except SluiceError:
            return None  # the chain says what is wrong with the name
        checked = check_inputs(request, model.spec.io)
        wanted = check_requested_outputs(request, model.spec.io)
        keyed = self._cache.enabled and model.engine is None
        keyed = keyed and (reads or (degraded is not None and degraded.from_cache))
        key = (
            await self._cache.key(request, model, wanted, payload_bytes=checked.payload_bytes)
            if keyed
            else None
        )
        return Prepared(model, wanted, checked.rows, key, reads, degraded)

    async def hit(
        self, prepared: Prepared, request: InferRequest, call: Call
    ) -> InferResult | None:
        """The cached answer to the call, if normal traffic reads the cache and it holds one."""
        if prepared.key is None or not prepared.reads:
            return None
        with self._tracing.span("sluice.cache", leaf=True) as span:
            entry = await self._cache.lookup(prepared.key, prepared.model)
            if span.is_recording():
                span.set_attribute("sluice.cache.hit", entry is not None)
        if entry is None:
            return None
        _weigh(call, entry.nbytes)
        return InferResult(
            model=entry.model,
            version=entry.version,
            backend=entry.backend,
            id=request.id,
            outputs=list(entry.outputs),
            routing=Routing(attempts=0, fallback=False, cached=True),
        )

    def keep(self, prepared: Prepared, result: InferResult) -> None:
        """Cache a successful answer of the version the key names (never a fallback's)."""
        if prepared.key is not None and result.routing is not None and not result.routing.fallback:
            self._cache.store(prepared.key, result, prepared.model)

    async def degraded(
        self,
        prepared: Prepared,
        request: InferRequest,
        call: Call,
        *,
        error: SluiceError,
        attempts: int,
    ) -> InferResult | None:
        """The degraded tier's answer to a call no candidate could answer (None: none);
        ``attempts``: what the chain tried first."""
        config = prepared.degraded
        if config is None:
            return None
        found = await self._from_cache(prepared) if config.from_cache else None
        if found is not None:
            source, (model, version, backend), outputs = CACHE, found[0], found[1]
        elif config.outputs:
            spec = prepared.model.spec
            source, (model, version, backend) = STATIC, (spec.name, spec.version, "")
            outputs = _static(config.arrays, prepared)
        else:
            return None
        _weigh(call, reply_size(output.array for output in outputs))
        self._mark(request.model, source, error)
        return InferResult(
            model=model,
            version=version,
            backend=backend,
            id=request.id,
            outputs=outputs,
            routing=Routing(attempts=attempts, fallback=False, degraded=source),
        )

    async def degraded_generation(
        self,
        request: GenerationRequest,
        keyed: KeyedGeneration | None,
        call: Call,
        *,
        error: SluiceError,
    ) -> Generation | None:
        """A generation model's degraded tier, for a generation no candidate could start:
        the kept generation of the same greedy request (``from_cache``), else its degraded
        text (None: neither)."""
        if request.model in self._aliases or request.backend:
            return None
        config = self._table.degraded(request.model)
        if config is None:
            return None
        reason = f"degraded ({CACHE}): {error.message}"
        if config.from_cache and keyed is not None:
            replayed = await self.replayed(keyed, call, degraded=reason)
            if replayed is not None:
                self._mark(request.model, CACHE, error)
                return replayed
        if config.text is None:
            return None
        try:
            version = self._table.get(request.model, request.version, healthy=False).spec.version
        except SluiceError:
            return None
        self._mark(request.model, STATIC, error)
        reason = f"degraded ({STATIC}): {error.message}"
        return StaticGeneration(Served(request.model, version), config.text, reason=reason)

    def _mark(self, model: str, source: str, error: SluiceError) -> None:
        """A degraded answer counted, logged and recorded on a span."""
        self._metrics.degraded_responses.labels(model, source).inc()
        attributes = {"sluice.degraded": source, "error.type": type(error).__name__}
        with self._tracing.span("sluice.degraded", attributes, leaf=True):
            log.warning(
                "model %s answered from its degraded tier (%s): %s",
                logs.clip(model),
                source,
                error.message,
            )

    async def generation_key(self, request: GenerationRequest) -> KeyedGeneration | None:
        """The cache key of a greedy generation of a model whose ``response_cache`` keeps
        generations, or whose degraded tier answers from the cache (None: not cached)."""
        if request.model in self._aliases or request.backend or not self._cache.enabled:
            return None
        config = self._table.response_cache(request.model)
        reads = config.enabled and config.generations
        degraded = self._table.degraded(request.model)
        kept = reads or (degraded is not None and degraded.from_cache)
        if not (kept and request.params.greedy):
            return None
        try:
            model = self._table.get(request.model, request.version, healthy=False)
        except SluiceError:
            return None  # the chain says what is wrong with the name
        if model.engine is None:
            return None
        return KeyedGeneration(await self._cache.generation_key(request, model), model, reads)

    async def replayed(
        self, keyed: KeyedGeneration, call: Call, *, degraded: str = ""
    ) -> ReplayedGeneration | None:
        """The kept generation of the same request, replayed (None: none kept); marked as
        the degraded tier's answer when ``degraded`` says why, else as a cache hit."""
        key, model = keyed.key, keyed.model
        with self._tracing.span("sluice.cache", leaf=True) as span:
            entry = await self._cache.lookup(key, model)
            if span.is_recording():
                span.set_attribute("sluice.cache.hit", entry is not None)
        if entry is None:
            return None
        _weigh(call, entry.nbytes)
        arrays = {output.name: output.array for output in entry.outputs}
        reason = FinishReason(arrays["finish_reason"][0].decode())
        texts, tokens = arrays["text"], arrays["token_ids"]
        chunks = [
            Chunk(text.decode(), int(token), reason if i == len(texts) - 1 else None)
            for i, (text, token) in enumerate(zip(texts, tokens, strict=True))
        ]
        served = Served(entry.model, entry.version, entry.backend)
        prompt_tokens = int(arrays["prompt_tokens"][0])
        return ReplayedGeneration(served, chunks, prompt_tokens=prompt_tokens, degraded=degraded)

    def recorded(self, keyed: KeyedGeneration, generation: Generation) -> Generation:
        """``generation``, kept under the key once it ends normally (only the version the
        key names: a fallback's generation is served as is)."""
        key, model = keyed.key, keyed.model
        spec = model.spec
        served = generation.spec
        if generation.endpoint or (served.name, served.version) != (spec.name, spec.version):
            return generation

        def keep(chunks: list[Chunk], prompt_tokens: int) -> None:
            text = np.array([chunk.text.encode() for chunk in chunks], dtype=object)
            reason = chunks[-1].finish_reason
            assert reason is not None
            outputs = [
                OutputTensor("text", "BYTES", text),
                OutputTensor(
                    "token_ids", "INT64", np.array([c.token_id for c in chunks], np.int64)
                ),
                OutputTensor(
                    "finish_reason", "BYTES", np.array([reason.value.encode()], dtype=object)
                ),
                OutputTensor("prompt_tokens", "INT64", np.array([prompt_tokens], np.int64)),
            ]
            result = InferResult(spec.name, spec.version, "", outputs, backend=spec.backend)
            self._cache.store(key, result, model)

        return RecordedGeneration(generation, keep)

    async def _from_cache(
        self, prepared: Prepared
    ) -> tuple[tuple[str, str, str], list[OutputTensor]] | None:
        if prepared.key is None:
            return None
        entry = await self._cache.lookup(prepared.key, prepared.model)
        if entry is None:
            return None
        return (entry.model, entry.version, entry.backend), list(entry.outputs)


def _static(arrays: Mapping[str, Array], prepared: Prepared) -> list[OutputTensor]:
    """The configured answer, once per row of a batching model's call."""
    spec = prepared.model.spec
    datatypes = {output.name: output.datatype for output in spec.io.outputs}
    outputs = []
    for name in prepared.wanted:
        array = arrays[name]
        if spec.io.batched and prepared.rows > 1:
            array = np.repeat(array, prepared.rows, axis=0)
        outputs.append(OutputTensor(name, datatypes[name], array))
    return outputs


def _weigh(call: Call, nbytes: int) -> None:
    """The reply goes on the call's admission ticket, like a computed one."""
    if call.ticket is not None:
        call.ticket.need(work_bytes=nbytes)
