"""What the router tells about each attempt: its log record and its span's attributes."""

from __future__ import annotations

import logging

from sluice import logs
from sluice.domain import InferRequest, InferResult
from sluice.errors import SluiceError
from sluice.registry.table import ModelTable
from sluice.routing.walk import Attempt, Walk, label
from sluice.tracing import Attributes

log = logging.getLogger(__name__)


def span_attributes(table: ModelTable, attempt: Attempt, number: int) -> Attributes:
    """Where an attempt goes: its model, and the version, backend and breaker state when
    the candidate resolves."""
    target = attempt.target
    attributes: dict[str, str | int | bool] = {
        "sluice.attempt": number,
        "sluice.model": target.model,
        "sluice.fallback": attempt.index > 0,
    }
    if target.endpoint:
        attributes["sluice.endpoint"] = target.endpoint
        return attributes
    try:
        model = table.get(target.model, target.version, backend=target.backend)
    except SluiceError:
        return attributes
    attributes["sluice.model.version"] = model.spec.version
    attributes["sluice.backend"] = model.spec.backend
    attributes["sluice.breaker.state"] = model.breaker.state
    return attributes


def log_attempt(
    request: InferRequest,
    attempt: Attempt,
    walk: Walk,
    latency_s: float,
    *,
    result: InferResult | None = None,
    error: SluiceError | None = None,
    then: Attempt | None = None,
) -> None:
    """One record per attempt: its outcome, the candidates passed over since the last
    record and, after a failure, where the call goes next. A first attempt that succeeds
    on the primary is the common case and goes to DEBUG (a log write per call costs the
    event loop); any call that needed a retry or a fallback has all its attempts at INFO,
    failures at WARNING."""
    skipped, walk.unlogged = ", ".join(walk.unlogged) or "-", []
    target = attempt.target
    plain = error is None and walk.attempts == 1 and target.model == request.model
    level = logging.DEBUG if plain else logging.INFO if error is None else logging.WARNING
    if not log.isEnabledFor(level):
        return
    backend = result.backend if result is not None else "-"
    version = result.version if result is not None else target.version or "serving"
    then_text = "-" if error is None else label(then.target) if then else "none"
    log.log(
        level,
        "attempt %d called=%s model=%s version=%s backend=%s outcome=%s latency_ms=%.3f "
        "error_class=%s skipped=%s next=%s",
        walk.attempts,
        logs.clip(request.model),
        logs.clip(label(target) if target.endpoint else target.model),
        logs.clip(version),
        backend,
        "ok" if error is None else "error",
        latency_s * 1000,
        "-" if error is None else ("transient" if error.transient else "fatal"),
        skipped,
        then_text,
        extra=logs.fields(
            model=label(target) if target.endpoint else target.model,
            version=version,
            backend=backend,
            outcome="ok" if error is None else type(error).__name__,
            attempt=walk.attempts,
            latency_ms=round(latency_s * 1000, 3),
            skipped=skipped,
            next=then_text,
        ),
    )
