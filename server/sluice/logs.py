"""Logs: one JSON object per line (text lines on a terminal), with the call's request id
and trace ids.

Every record gets ``timestamp`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``;
inside a call also ``request_id`` and, when tracing is on, ``trace_id`` and ``span_id``.
Call sites add what they know through ``extra=fields(model=..., version=..., backend=...,
outcome=...)``: only the names in ``FIELDS`` ever reach the output, so a stray ``extra``
can never leak a payload or a credential into the logs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from sluice import callctx
from sluice.settings import LogFormat

#: The optional per-record fields a call site may set (through ``fields``).
FIELDS = (
    "model",
    "version",
    "backend",
    "outcome",
    "method",
    "code",
    "latency_ms",
    "attempt",
    "skipped",
    "next",
    "p95_ms",
    "guardrail_ms",
)
_EXTRA_KEY = "sluice_fields"


MAX_VALUE_CHARS = 200
"""Longest caller-supplied string a log line carries (``clip``)."""

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def clip(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """A caller-supplied string made safe for a log line: at most ``limit`` characters
    (saying how long it was) and no control characters (no forged lines)."""
    if len(value) > limit:
        value = f"{value[:limit]}...({len(value)} characters)"
    return value.translate(_CONTROL)


def fields(**values: str | int | float) -> dict[str, Any]:
    """``extra=`` for a log call: structured fields of the record (names from ``FIELDS``)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log field(s): {', '.join(sorted(unknown))}")
    return {_EXTRA_KEY: values}


class Every:
    """Lets a warning that can repeat once per call through at most once per ``interval_s``
    (a caller who can trigger it at will must not be able to fill the log); the ones held
    back are counted, for the next one let through to say."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next = -math.inf
        self._held = 0

    def due(self) -> int | None:
        """None while the last warning is recent; else how many were held back since it."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._interval_s
        held, self._held = self._held, 0
        return held


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = callctx.request_id.get()
        if request_id:
            entry["request_id"] = request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        extra = getattr(record, _EXTRA_KEY, None)
        if isinstance(extra, dict):
            entry.update((k, v) for k, v in extra.items() if k in FIELDS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record is one line: control characters in the message are escaped (the
        # traceback, added after this, keeps its lines).
        line = super().formatMessage(record).translate(_CONTROL)
        request_id = callctx.request_id.get()
        return f"{line} [request {request_id}]" if request_id else line


def configure(level: str, log_format: LogFormat) -> None:
    """Send the root logger's records to stderr in ``log_format`` (called once, in ``main``);
    ``auto`` is text for a person at a terminal and JSON for a log collector."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
