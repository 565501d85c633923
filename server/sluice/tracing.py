"""OpenTelemetry tracing: a span for every stage a call goes through, or nothing at all.

``Tracing.from_environment`` builds the SDK pipeline from the standard ``OTEL_*``
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``,
``OTEL_BSP_*``...) and exports over OTLP/gRPC from a background thread. Tracing is off unless
``tracing.enabled`` says so or an OTLP endpoint is configured; off, every helper here returns a
shared do-nothing object, so call sites cost an attribute check. Spans are queued in memory
and dropped when the queue is full: an unreachable or broken collector never slows a call,
and a pipeline that cannot be built is logged and left off rather than stopping the server.

The spans of a call (names and the attributes they carry):

    <package.Service>/<Method>   server span; honours an incoming ``traceparent``;
    │                            request id, the call's budget (``sluice.budget_s``)
    ├── sluice.admission         in-flight and quota check
    ├── sluice.attempt           one per execution attempt: model, version, backend,
    │   │                        breaker state, attempt number, error class
    │   ├── sluice.queue_wait    time in the model version's batcher queue
    │   └── sluice.remote        a remote candidate's call: endpoint, model (its
    │                            ``traceparent`` goes along)
    ├── sluice.fallback          a hop to the next candidate after a failed attempt
    ├── sluice.prefill           generation: the prompt's forward pass
    └── sluice.decode            generation: one summary span (tokens, steps)
    sluice.batch                 one per executor run, linked to every request span in it

For generation code::

    with tracing.prefill_span(model=m, version=v, prompt_tokens=n):
        ...
    with tracing.decode_span(model=m, version=v) as span:
        ...
        record_decode_summary(span, tokens=generated, steps=steps)

Work that continues in another task (a continuous batcher) captures ``tracing.capture()``
where the call is and passes it as ``parent=`` to the helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from sluice.errors import SluiceError
from sluice.settings import TracingSettings

log = logging.getLogger(__name__)

__all__ = [
    "UNTRACED",
    "Attributes",
    "Context",
    "Tracing",
    "annotate",
    "error_class",
    "now_ns",
    "outgoing_context",
    "record_decode_summary",
    "record_error",
]

Attributes = Mapping[str, str | int | float | bool]

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_OFF_SPAN = trace.INVALID_SPAN


class _Off:
    """The context manager every helper returns while tracing is off: yields a span that
    records nothing, allocates nothing."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return _OFF_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_OFF = _Off()
#: What a helper returns while tracing is off; also for calls that are never traced.
UNTRACED: contextlib.AbstractContextManager[Span] = _OFF


def current_again(span: Span) -> contextlib.AbstractContextManager[Span]:
    """``span``, already ended, as the current span again, so that a log record written
    about it after the fact carries its ids; nothing while tracing is off."""
    if not span.get_span_context().is_valid:
        return _OFF
    return trace.use_span(span, end_on_exit=False)


def error_class(exc: BaseException) -> str:
    """``transient`` (worth retrying), ``fatal``, or ``internal`` for anything unexpected."""
    if isinstance(exc, SluiceError):
        return "transient" if exc.transient else "fatal"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "internal"


def record_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed with the error's type and class (never its payload)."""
    if not span.is_recording():
        return
    span.set_attribute("error.type", type(exc).__name__)
    span.set_attribute("sluice.error_class", error_class(exc))
    message = exc.message if isinstance(exc, SluiceError) else type(exc).__name__
    span.set_status(Status(StatusCode.ERROR, message))


def record_decode_summary(
    span: Span, *, tokens: int, steps: int, finish_reason: str = "", prompt_tokens: int = 0
) -> None:
    """Put a generation's decode totals on its ``decode_span`` (a no-op while tracing is off)."""
    if not span.is_recording():
        return
    span.set_attribute("sluice.decode.tokens", tokens)
    span.set_attribute("sluice.decode.steps", steps)
    if prompt_tokens:
        span.set_attribute("sluice.prompt_tokens", prompt_tokens)
    if finish_reason:
        span.set_attribute("sluice.finish_reason", finish_reason)


class Tracing:
    """The server's tracer, or none (``enabled`` False): built once in ``main``, passed down."""

    def __init__(
        self, provider: TracerProvider | None = None, *, flush_timeout_s: float = 5.0
    ) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("sluice") if provider is not None else None
        self._flush_timeout_s = flush_timeout_s
        self.enabled = self._tracer is not None

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def from_environment(
        cls, settings: TracingSettings, environ: Mapping[str, str] | None = None
    ) -> Tracing:
        """Tracing as ``settings`` and the ``OTEL_*`` variables ask; off when they do not, or
        when the pipeline cannot be built (logged, never fatal)."""
        env = os.environ if environ is None else environ
        if not _wanted(settings, env):
            return cls.off()
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        except Exception as exc:  # a bad OTEL_* value must not stop the server starting
            log.error("tracing is off: the OTLP exporter could not be built: %s", exc)
            return cls.off()
        where = next((env[v] for v in _ENDPOINT_VARIABLES if env.get(v)), "localhost:4317")
        log.info("tracing on: spans go over OTLP to %s", where)
        return cls.with_exporter(exporter, flush_timeout_s=settings.flush_timeout_s)

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, *, flush_timeout_s: float = 5.0) -> Tracing:
        """Tracing through ``exporter`` with the SDK's sampler (``OTEL_TRACES_SAMPLER``) and
        batch processor (``OTEL_BSP_*``)."""
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "sluice"}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, flush_timeout_s=flush_timeout_s)

    async def flush(self) -> bool:
        """Export every ended span now (from a thread); False if that took too long."""
        if self._provider is None:
            return True
        timeout_ms = int(self._flush_timeout_s * 1000)
        return await asyncio.to_thread(self._provider.force_flush, timeout_ms)

    async def shutdown(self) -> None:
        """Export what is queued (at most ``flush_timeout_s``), then stop the exporter."""
        if self._provider is None:
            return
        provider, self._provider, self._tracer = self._provider, None, None
        self.enabled = False
        timeout_ms = int(self._flush_timeout_s * 1000)
        await asyncio.to_thread(provider.force_flush, timeout_ms)
        await asyncio.to_thread(provider.shutdown)

    # -- spans ----------------------------------------------------------------------------

    def capture(self) -> Context | None:
        """The current context, to parent spans made later in another task (None: off)."""
        return otel_context.get_current() if self._tracer is not None else None

    def server_span(
        self, method: str, metadata: Iterable[tuple[str, Any]], attributes: Attributes
    ) -> contextlib.AbstractContextManager[Span]:
        """The server span of one call, child of the caller's ``traceparent`` if it sent one."""
        if self._tracer is None:
            return _OFF
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            f"{service}/{name}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                **attributes,
            },
        )
        return self._active(span, record=False)

    def span(
        self,
        name: str,
        attributes: Attributes | None = None,
        *,
        parent: Context | None = None,
        leaf: bool = False,
    ) -> contextlib.AbstractContextManager[Span]:
        """A child span of the current one (or of ``parent``), current while inside unless
        it is a ``leaf`` (no span starts inside it: it skips the context switch)."""
        if self._tracer is None:
            return _OFF
        span = self._tracer.start_span(name, parent, attributes=attributes)
        return self._ended(span) if leaf else self._active(span)

    def prefill_span(
        self, *, model: str, version: str, prompt_tokens: int, parent: Context | None = None
    ) -> contextlib.AbstractContextManager[Span]:
        """Generation: the prompt's forward pass, until the first token is out (a leaf)."""
        return self.span(
            "sluice.prefill",
            {
                "sluice.model": model,
                "sluice.model.version": version,
                "sluice.prompt_tokens": prompt_tokens,
            },
            parent=parent,
            leaf=True,
        )

    def decode_span(
        self, *, model: str, version: str, parent: Context | None = None
    ) -> contextlib.AbstractContextManager[Span]:
        """Generation: all decode steps of one request; end it with ``record_decode_summary``.
        A leaf (never current), so it may stay open across tasks while the stream runs."""
        return self.span(
            "sluice.decode",
            {"sluice.model": model, "sluice.model.version": version},
            parent=parent,
            leaf=True,
        )

    def batch_span(
        self,
        requests: Iterable[tuple[Context | None, int]],
        attributes: Attributes,
        *,
        rows: int,
    ) -> contextlib.AbstractContextManager[Span]:
        """One executor run of ``rows`` rows. ``requests``: each request's captured context
        and enqueue time (``time.time_ns``). Each gets a finished ``sluice.queue_wait`` span
        ending now; the run is a root span linked to every request's span."""
        if self._tracer is None:
            return _OFF
        contexts = []
        for parent, start_ns in requests:
            if parent is not None:
                self._tracer.start_span("sluice.queue_wait", parent, start_time=start_ns).end()
                contexts.append(parent)
        links = [Link(trace.get_current_span(ctx).get_span_context()) for ctx in contexts]
        span = self._tracer.start_span(
            "sluice.batch",
            Context(),
            links=links,
            attributes={
                **attributes,
                "sluice.batch.size": rows,
                "sluice.batch.requests": len(contexts),
            },
        )
        return self._ended(span)

    @staticmethod
    @contextlib.contextmanager
    def _ended(span: Span) -> Iterator[Span]:
        """Ends ``span`` on the way out, recording an error; never makes it current."""
        try:
            yield span
        except BaseException as exc:
            record_error(span, exc)
            raise
        finally:
            span.end()

    @staticmethod
    @contextlib.contextmanager
    def _active(span: Span, *, record: bool = True) -> Iterator[Span]:
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        except BaseException as exc:
            if record:
                record_error(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()


def annotate(name: str, value: str | int | float | bool) -> None:
    """Set an attribute on the current span (nothing while tracing is off)."""
    trace.get_current_span().set_attribute(name, value)


def outgoing_context() -> dict[str, str]:
    """The current trace context as headers for a call to another server (``traceparent``,
    ``tracestate``); empty when no span is current."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def now_ns() -> int:
    """Wall-clock nanoseconds, the time base of span timestamps (never used for timeouts)."""
    return time.time_ns()


def _wanted(settings: TracingSettings, env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if settings.enabled is not None:
        return settings.enabled
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return exporter == "otlp" or any(env.get(v) for v in _ENDPOINT_VARIABLES)
