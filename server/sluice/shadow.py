"""Shadow traffic: a sample of a model's calls mirrored to a shadow target, and compared.

A model's config names a shadow (another model, or another version of itself) and the share
of its calls to mirror. After the primary has answered, ``Shadower`` draws whether to mirror
the call. A sampled call becomes a background task that nobody on the request path awaits:
it sends the same request straight to the service (never through the router, so a shadow has
no fallbacks, retries or shadows of its own) under its own budget, and compares the answers:

- tensor models: the largest absolute and relative difference over all outputs, the
  relative one as ``|a - b| / max(|a|, |b|)`` (0 where both are 0, at most 2 otherwise);
  an output missing from the shadow's answer, of another shape, or a BYTES output that
  differs fails the comparison;
- generation models, greedy calls only (two sampled draws cannot be compared): the same
  prompt and parameters run on the shadow; exact match of the token ids, and token
  agreement (positions equal up to the shorter output, over the longer one). A generation
  model called through ModelInfer is not mirrored (its answer is text; its streams are).

Outcomes, per shadowed model: *mirrored* (sent to the shadow), then *compared* or *failed*
(an error, no answer within the budget, or answers that cannot be compared); *skipped*: a
sampled call that found ``max_concurrency`` mirrors already in flight (it is dropped, never
queued). The kill switch (``enabled``) stops new mirrors at once; those in flight finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sluice.errors import ModelNotFoundError, SluiceError
from sluice.generation.generate import Chunk
from sluice.generation.sampling import SamplingParams
from sluice.metrics import Metrics
from sluice.repository import ShadowConfig
from sluice.service import InferenceService
from sluice.settings import ShadowSettings
from sluice.tensors import Array, InferRequest, InferResult, OutputTensor

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class _Compared:
    """One comparison: tensors' largest differences, or a generation's tokens."""

    abs_diff: float = 0.0
    rel_diff: float = 0.0
    #: Generation models: exact match, agreeing positions, positions compared.
    tokens: tuple[bool, int, int] | None = None


#: One mirror: given its deadline (service clock), call the shadow and compare.
_Mirror = Callable[[float], Awaitable[_Compared]]


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """How a model's shadow compares with it so far."""

    model: str
    target: str
    fraction: float
    mirrored: int
    compared: int
    failed: int
    skipped: int
    max_abs_diff: float
    max_rel_diff: float
    exact_match_rate: float
    token_agreement: float


@dataclass(slots=True)
class _Tally:
    target: str
    mirrored: int = 0
    compared: int = 0
    failed: int = 0
    skipped: int = 0
    inflight: int = 0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    generations: int = 0
    exact_matches: int = 0
    tokens: int = 0
    agreeing_tokens: int = 0


class Mismatch(Exception):
    """The shadow answered, but its answer cannot be compared with the primary's."""


def compare_tensors(
    primary: Sequence[OutputTensor], shadow: Sequence[OutputTensor]
) -> tuple[float, float]:
    """The largest absolute and relative difference over all of the primary's outputs."""
    theirs = {tensor.name: tensor.array for tensor in shadow}
    worst_abs = worst_rel = 0.0
    for tensor in primary:
        other = theirs.get(tensor.name)
        if other is None:
            raise Mismatch(f"the shadow returned no output '{tensor.name}'")
        if tensor.array.shape != other.shape:
            raise Mismatch(
                f"output '{tensor.name}' has shape {list(tensor.array.shape)} but the "
                f"shadow's has {list(other.shape)}"
            )
        abs_diff, rel_diff = _difference(tensor.name, tensor.array, other)
        worst_abs, worst_rel = max(worst_abs, abs_diff), max(worst_rel, rel_diff)
    return worst_abs, worst_rel


def _difference(name: str, ours: Array, theirs: Array) -> tuple[float, float]:
    numeric = "biuf"  # bool, signed, unsigned, float
    if ours.dtype.kind not in numeric or theirs.dtype.kind not in numeric:
        if np.array_equal(ours, theirs):
            return 0.0, 0.0
        raise Mismatch(f"output '{name}' differs (its values are not numbers)")
    if ours.size == 0:
        return 0.0, 0.0
    a, b = ours.astype(np.float64), theirs.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.abs(a - b))
        rel = np.where(same, 0.0, diff / np.maximum(np.abs(a), np.abs(b)))
    # One side NaN (or infinite against finite): as different as it gets.
    diff, rel = np.nan_to_num(diff, nan=np.inf), np.nan_to_num(rel, nan=np.inf)
    return float(diff.max()), float(rel.max())


def compare_tokens(ours: Sequence[int], theirs: Sequence[int]) -> tuple[bool, int, int]:
    """Exact match, positions that agree (up to the shorter), and the longer length."""
    agreeing = sum(a == b for a, b in zip(ours, theirs, strict=False))
    return list(ours) == list(theirs), agreeing, max(len(ours), len(theirs))


class GenerationTrace:
    """A sampled greedy generation: the tokens it made, mirrored once it ends normally."""

    __slots__ = ("_shadower", "model", "params", "prompt", "tokens")

    def __init__(self, shadower: Shadower, model: str, prompt: str, params: SamplingParams) -> None:
        self._shadower = shadower
        self.model = model
        self.prompt = prompt
        self.params = params
        self.tokens: list[int] = []

    def keep(self, chunk: Chunk) -> None:
        self.tokens.append(chunk.token_id)

    def finished(self) -> None:
        """The generation ended normally (a stop or its length): mirror it."""
        self._shadower.mirror_generation(self)


class Shadower:
    """Samples, mirrors and compares; the request paths call it synchronously, it never
    makes them wait."""

    def __init__(
        self,
        service: InferenceService,
        settings: ShadowSettings,
        *,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._service = service
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._random = rng or random.Random(settings.seed)
        self._tallies: dict[str, _Tally] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.enabled = settings.enabled

    def set_enabled(self, enabled: bool, *, reason: str = "") -> bool:
        """The kill switch: off, no new mirror starts (those in flight finish)."""
        if enabled != self.enabled:
            log.warning(
                "shadowing turned %s: %s", "on" if enabled else "off", reason or "no reason given"
            )
        self.enabled = enabled
        return enabled

    # -- the request paths' side: synchronous, nothing awaited ----------------------------

    def after_infer(self, request: InferRequest, result: InferResult) -> None:
        """``model`` answered ``request`` with ``result``: maybe mirror the call."""
        model = result.model
        config = self._config(model)
        if config is None or self._service.is_generation_model(model, result.version):
            return
        if not self._drawn(config):
            return
        sent = dataclasses.replace(
            request, model=config.model or model, version=config.version, backend=""
        )

        async def mirror(deadline: float) -> _Compared:
            answer = await self._service.infer(sent, deadline=deadline)
            return _Compared(*compare_tensors(result.outputs, answer.outputs))

        self._launch(model, config, mirror)

    def generation_trace(
        self, model: str, prompt: str, params: SamplingParams
    ) -> GenerationTrace | None:
        """A generation starts on ``model``: a trace to keep its tokens in when the call is
        sampled (greedy calls only), else None."""
        if not params.greedy:
            return None
        config = self._config(model)
        if config is None or not self._drawn(config):
            return None
        return GenerationTrace(self, model, prompt, params)

    def mirror_generation(self, trace: GenerationTrace) -> None:
        model = trace.model
        config = self._config(model)
        if config is None:  # switched off (or the model reloaded without one) meanwhile
            return

        async def mirror(deadline: float) -> _Compared:
            target = self._service.generation_model(config.model or model, config.version)
            generator = target.generator
            assert generator is not None
            prompt_ids = await generator.encode_prompt(trace.prompt)
            with target.breaker.calling():
                async with generator.submit(prompt_ids, trace.params, deadline=deadline) as out:
                    tokens = [chunk.token_id async for chunk in out]
            return _Compared(tokens=compare_tokens(trace.tokens, tokens))

        self._launch(model, config, mirror)

    def _config(self, model: str) -> ShadowConfig | None:
        return self._service.shadow(model) if self.enabled else None

    def _drawn(self, config: ShadowConfig) -> bool:
        return self._random.random() < config.fraction

    def _launch(self, model: str, config: ShadowConfig, mirror: _Mirror) -> None:
        tally = self._tally(model, config)
        if tally.inflight >= (config.max_concurrency or self._settings.max_concurrency):
            tally.skipped += 1
            self._metrics.shadow_requests.labels(model, "skipped").inc()
            return
        tally.inflight += 1
        tally.mirrored += 1
        self._metrics.shadow_requests.labels(model, "mirrored").inc()
        budget_s = config.budget_s or self._settings.budget_s
        task = asyncio.get_running_loop().create_task(self._run(model, tally, budget_s, mirror))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model: str, tally: _Tally, budget_s: float, mirror: _Mirror) -> None:
        """One mirror under its budget; whatever happens ends in the tally, never raised."""
        try:
            async with asyncio.timeout(budget_s):
                compared = await mirror(self._clock() + budget_s)
        except TimeoutError:
            self._failed(model, tally, f"no answer within its {budget_s:g}s budget")
        except SluiceError as exc:
            self._failed(model, tally, exc.message)
        except Mismatch as exc:
            self._failed(model, tally, str(exc))
        except Exception as exc:
            log.warning("shadow of %s: unexpected error", model, exc_info=True)
            self._failed(model, tally, type(exc).__name__)
        else:
            self._compared(model, tally, compared)
        finally:
            tally.inflight -= 1

    # -- the tally ------------------------------------------------------------------------

    def _tally(self, model: str, config: ShadowConfig) -> _Tally:
        """The model's tally; a new shadow target starts a new one."""
        target = _target(model, config)
        tally = self._tallies.get(model)
        if tally is None or tally.target != target:
            tally = self._tallies[model] = _Tally(target)
        return tally

    def _failed(self, model: str, tally: _Tally, reason: str) -> None:
        tally.failed += 1
        self._metrics.shadow_requests.labels(model, "failed").inc()
        log.debug("shadow %s of %s failed: %s", tally.target, model, reason)

    def _compared(self, model: str, tally: _Tally, compared: _Compared) -> None:
        tally.compared += 1
        metrics = self._metrics
        metrics.shadow_requests.labels(model, "compared").inc()
        if compared.tokens is None:
            tally.max_abs_diff = max(tally.max_abs_diff, compared.abs_diff)
            tally.max_rel_diff = max(tally.max_rel_diff, compared.rel_diff)
            metrics.shadow_max_abs_diff.labels(model).set(tally.max_abs_diff)
            metrics.shadow_max_rel_diff.labels(model).set(tally.max_rel_diff)
            return
        exact, agreeing, tokens = compared.tokens
        tally.generations += 1
        tally.exact_matches += exact
        tally.agreeing_tokens += agreeing
        tally.tokens += tokens
        metrics.shadow_exact_matches.labels(model).inc(exact)
        metrics.shadow_tokens.labels(model).inc(tokens)
        metrics.shadow_agreeing_tokens.labels(model).inc(agreeing)

    # -- reading and stopping -------------------------------------------------------------

    def reports(self, model: str = "") -> list[ShadowReport]:
        """One model's report, or every model's that has (or had) a shadow target."""
        if model:
            if not self._service.has_model(model) and model not in self._tallies:
                raise ModelNotFoundError(f"unknown model '{model}'")
            names = [model]
        else:
            configured = [n for n in self._service.model_names() if self._service.shadow(n)]
            names = sorted({*configured, *self._tallies})
        return [self._report(name) for name in names]

    def _report(self, model: str) -> ShadowReport:
        config = self._service.shadow(model)
        tally = self._tallies.get(model)
        if tally is None or (config is not None and tally.target != _target(model, config)):
            tally = _Tally(_target(model, config) if config is not None else "")
        return ShadowReport(
            model=model,
            target=tally.target,
            fraction=config.fraction if config is not None else 0.0,
            mirrored=tally.mirrored,
            compared=tally.compared,
            failed=tally.failed,
            skipped=tally.skipped,
            max_abs_diff=tally.max_abs_diff,
            max_rel_diff=tally.max_rel_diff,
            exact_match_rate=tally.exact_matches / tally.generations if tally.generations else 0.0,
            token_agreement=tally.agreeing_tokens / tally.tokens if tally.tokens else 0.0,
        )

    async def close(self) -> None:
        """Cancel the mirrors in flight (the server is draining)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _target(model: str, config: ShadowConfig) -> str:
    name = config.model or model
    return f"{name}/{config.version}" if config.version else name
