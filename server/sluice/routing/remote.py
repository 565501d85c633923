"""Remote candidates: a fallback (or an alias entry) served by another Open Inference
Protocol server (another Sluice, Triton...), named by its ``endpoint``.

A remote candidate walks the same chain as a local one, under the same retry layer: the
attempt gets the share of the caller's remaining deadline a local attempt gets, sent as
the call's gRPC timeout (the remote sees ``grpc-timeout``), with the call's request id
(``x-request-id``) and trace context (``traceparent``). Each (endpoint, model, version) has
its own breaker (``breaker`` settings) and its own readiness, which the health prober keeps
(``ModelReady`` on the remote, every probe interval; unknown counts as ready until the first
probe): a candidate whose breaker is open or that is not ready is passed over like a local
version. A call over ``remote.max_inflight_per_endpoint`` passes it over too.

The remote's status decides what the walk does next: UNAVAILABLE, DEADLINE_EXCEEDED and any
fault of the remote (INTERNAL, UNKNOWN...) are transient and count against its breaker;
RESOURCE_EXHAUSTED (the remote sheds load) and NOT_FOUND (it does not serve the model) are
transient and do not; INVALID_ARGUMENT is the caller's: returned as is, never retried.

Inputs go to the remote as the caller sent them (they are checked there, against the
remote's model, not here); its outputs come back as received, within
``remote.max_reply_bytes``. The transport's ``outbound`` module makes the calls
(``RemoteClient``); this module holds the policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Protocol

from sluice import callctx, logs
from sluice.breaker import BackendBreaker
from sluice.clock import Clock
from sluice.domain import GenerationRequest, InferRequest, InferResult
from sluice.errors import (
    BreakerOpenError,
    DeadlineExceededError,
    ExecutorError,
    InvalidInputError,
    ModelNotReadyError,
    SluiceError,
    UnavailableError,
)
from sluice.metrics import Metrics
from sluice.routing.generations import RemoteChunk, RemoteGeneration
from sluice.routing.walk import label
from sluice.settings import FallbackTarget, Settings
from sluice.tracing import Tracing, outgoing_context

log = logging.getLogger(__name__)

REMOTE_BACKEND = "remote"
"""The backend an answer from a remote candidate reports."""

_CALLERS_FAULT = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
_NOT_ITS_FAULT = frozenset({"RESOURCE_EXHAUSTED", "NOT_FOUND", "REPLY_TOO_LARGE"})
_MAX_MESSAGE_CHARS = 500


class RemoteCallError(Exception):
    """A remote endpoint answered with a gRPC error (or could not be reached)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteClient(Protocol):
    """Calls to remote endpoints (``transport.outbound``); errors are ``RemoteCallError``."""

    async def infer(
        self,
        target: FallbackTarget,
        request: InferRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> InferResult: ...

    def generate(
        self,
        target: FallbackTarget,
        request: GenerationRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> AsyncGenerator[RemoteChunk, None]:
        """The remote's ``sluice.v1.GenerationService/Generate`` stream; closing the
        generator ends the call."""
        ...

    async def ready(self, target: FallbackTarget, *, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class _Remote:
    """One (endpoint, model, version): its breaker and what its last probe found."""

    def __init__(self, breaker: BackendBreaker) -> None:
        self.breaker = breaker
        self.problem: str | None = None


class Remotes:
    """Every remote candidate's breaker, readiness and calls."""

    def __init__(
        self,
        client: RemoteClient | None,
        settings: Settings,
        *,
        targets: Callable[[], list[FallbackTarget]],
        metrics: Metrics,
        clock: Clock,
        tracing: Tracing,
    ) -> None:
        self._client = client
        self._breaker_settings = settings.breaker
        self._max_inflight = settings.remote.max_inflight_per_endpoint
        self._targets = targets
        self._metrics = metrics
        self._remote_metrics = metrics.remote
        self._clock = clock
        self._tracing = tracing
        self._remotes: dict[tuple[str, str, str], _Remote] = {}
        self._inflight: dict[str, int] = {}
        self._remote_metrics.limit.labels("max_inflight_per_endpoint").set(self._max_inflight)
        self._remote_metrics.limit.labels("max_reply_bytes").set(settings.remote.max_reply_bytes)

    def _get(self, target: FallbackTarget) -> _Remote:
        key = (target.endpoint, target.model, target.version)
        remote = self._remotes.get(key)
        if remote is None:
            model, version = f"{target.endpoint}/{target.model}", target.version

            def changed(_old: str, new: str) -> None:
                self._metrics.breaker_changed(model, version, REMOTE_BACKEND, new)

            breaker = BackendBreaker(
                label(target), self._breaker_settings, clock=self._clock, on_change=changed
            )
            remote = self._remotes[key] = _Remote(breaker)
        return remote

    def breaker_state(self, target: FallbackTarget) -> str:
        return self._get(target).breaker.state

    def check(self, target: FallbackTarget) -> None:
        """Raise when the candidate cannot take a call now: not ready, or breaker open."""
        remote = self._get(target)
        if self._client is None:
            raise ModelNotReadyError(f"{label(target)}: this server makes no remote calls")
        if remote.problem is not None:
            raise ModelNotReadyError(f"{label(target)} is not ready: {remote.problem}")
        if remote.breaker.is_open():
            raise BreakerOpenError(
                f"{label(target)} is failing and its circuit breaker is open; retry later"
            )

    async def infer(
        self, target: FallbackTarget, request: InferRequest, *, timeout_s: float | None
    ) -> InferResult:
        """One attempt on the remote candidate, within ``timeout_s`` (the attempt's share
        of the caller's deadline)."""
        endpoint = target.endpoint
        self._enter(target)
        attributes = {"sluice.endpoint": endpoint, "sluice.model": target.model}
        started = self._clock()
        code = "CANCELLED"  # until the call ends otherwise (the caller may leave)
        try:
            with self._tracing.span("sluice.remote", attributes) as span:
                result = await self._call(target, request, timeout_s)
                code = "OK"
                if span.is_recording():
                    span.set_attribute("sluice.model.version", result.version)
        except RemoteCallError as exc:
            code = exc.code
            raise self._error(target, exc) from exc
        finally:
            self._leave(target, code, started)
        result.endpoint = endpoint
        result.backend = result.backend or REMOTE_BACKEND
        return result

    def _enter(self, target: FallbackTarget) -> None:
        """Count a call in flight to the candidate's endpoint, if it is ready and has room."""
        self.check(target)
        endpoint = target.endpoint
        if self._inflight.get(endpoint, 0) >= self._max_inflight:
            self._remote_metrics.requests.labels(endpoint, target.model, "LIMIT").inc()
            raise UnavailableError(
                f"{endpoint} has {self._max_inflight} calls in flight from this server "
                "(remote.max_inflight_per_endpoint)"
            )
        self._inflight[endpoint] = self._inflight.get(endpoint, 0) + 1
        self._remote_metrics.inflight.labels(endpoint).inc()

    def _leave(self, target: FallbackTarget, code: str, started: float) -> None:
        endpoint = target.endpoint
        self._inflight[endpoint] -= 1
        self._remote_metrics.inflight.labels(endpoint).dec()
        self._remote_metrics.requests.labels(endpoint, target.model, code).inc()
        self._remote_metrics.seconds.labels(endpoint, target.model).observe(self._clock() - started)

    async def _call(
        self, target: FallbackTarget, request: InferRequest, timeout_s: float | None
    ) -> InferResult:
        assert self._client is not None
        try:
            with self._get(target).breaker.calling():
                try:
                    return await self._client.infer(
                        target, request, timeout_s=timeout_s, metadata=_metadata()
                    )
                except RemoteCallError as exc:
                    raise _wrapped(exc) from exc
        except (_Passed, _Fault) as wrapped:
            raise wrapped.error from None

    async def generate(
        self,
        target: FallbackTarget,
        request: GenerationRequest,
        *,
        timeout_s: float | None,
        first_token_s: float | None,
    ) -> RemoteGeneration:
        """A generation on the remote candidate, once its first message arrived: within
        ``first_token_s`` (the attempt's share of the deadline; None: the call's own), the
        call itself within ``timeout_s`` (the caller's remaining deadline). Failing or
        silent before its first message counts against its breaker; after it, a failure
        ends the stream with UNAVAILABLE."""
        self._enter(target)
        assert self._client is not None  # check() refuses without one
        started = self._clock()
        # Filled inside the ``sluice.remote`` span (the call starts at the first message
        # asked for), so the remote's spans are its children, as a tensor call's are.
        metadata: list[tuple[str, str]] = []
        stream = self._client.generate(target, request, timeout_s=timeout_s, metadata=metadata)
        outcome = ["CANCELLED"]  # until the stream ends otherwise
        relays: list[AsyncGenerator[RemoteChunk, None]] = []
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                for relay in relays:
                    await relay.aclose()
                await stream.aclose()
                self._leave(target, outcome[0], started)

        attributes = {"sluice.endpoint": target.endpoint, "sluice.model": target.model}
        try:
            with self._tracing.span("sluice.remote", attributes):
                metadata.extend(_metadata())
                first = await self._first(target, stream, first_token_s)
        except RemoteCallError as exc:
            outcome[0] = exc.code
            await close()
            raise self._error(target, exc) from exc
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                outcome[0] = "DEADLINE_EXCEEDED"
            await close()
            raise
        if _ends(first):
            outcome[0] = "OK"
        relays.append(_relay(target, stream, outcome))
        return RemoteGeneration(first, relays[0], endpoint=target.endpoint, close=close)

    async def _first(
        self,
        target: FallbackTarget,
        stream: AsyncGenerator[RemoteChunk, None],
        first_token_s: float | None,
    ) -> RemoteChunk:
        try:
            with self._get(target).breaker.calling():
                try:
                    async with asyncio.timeout(first_token_s):
                        first = await anext(stream, None)
                except RemoteCallError as exc:
                    raise _wrapped(exc) from exc
                if first is None:
                    raise _Fault(RemoteCallError("INTERNAL", "its stream ended with no message"))
                return first
        except (_Passed, _Fault) as wrapped:
            raise wrapped.error from None

    def _error(self, target: FallbackTarget, exc: RemoteCallError) -> SluiceError:
        said = logs.clip(exc.message, _MAX_MESSAGE_CHARS)
        message = f"{label(target)} answered {exc.code}: {said}"
        if exc.code in _CALLERS_FAULT:
            return InvalidInputError(message)
        if exc.code == "DEADLINE_EXCEEDED":
            return DeadlineExceededError(message)
        if exc.code == "NOT_FOUND":
            return ModelNotReadyError(message)
        if exc.code in _NOT_ITS_FAULT:
            return UnavailableError(message)
        return ExecutorError(message)

    async def probe_all(self, timeout_s: float) -> None:
        """Ask every remote candidate whether it is ready (``ModelReady``), concurrently."""
        if self._client is None:
            return
        targets = {(t.endpoint, t.model, t.version): t for t in self._targets()}
        await asyncio.gather(*(self._probe(target, timeout_s) for target in targets.values()))

    async def _probe(self, target: FallbackTarget, timeout_s: float) -> None:
        assert self._client is not None
        remote = self._get(target)
        try:
            problem = (
                None
                if await self._client.ready(target, timeout_s=timeout_s)
                else "ModelReady says not ready"
            )
        except RemoteCallError as exc:
            problem = f"ModelReady answered {exc.code}: {logs.clip(exc.message, 200)}"
        if problem != remote.problem:
            if problem is None:
                log.info("remote candidate %s is ready", label(target))
            else:
                log.warning("remote candidate %s: %s", label(target), problem)
        remote.problem = problem
        self._remote_metrics.ready.labels(target.endpoint, target.model, target.version).set(
            problem is None
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _metadata() -> list[tuple[str, str]]:
    """The call's trace context and request id, for the remote."""
    metadata = [*outgoing_context().items()]
    request_id = callctx.request_id.get()
    if request_id:
        metadata.append((callctx.REQUEST_ID_KEY, request_id))
    return metadata


def _wrapped(exc: RemoteCallError) -> _Passed | _Fault:
    """Whether the remote's error counts against its breaker (``_Fault``) or not."""
    if exc.code in _CALLERS_FAULT or exc.code in _NOT_ITS_FAULT:
        return _Passed(exc)  # not the remote's fault: no breaker count
    return _Fault(exc)


def _ends(message: RemoteChunk) -> bool:
    return any(chunk.finish_reason is not None for chunk in message.chunks)


async def _relay(
    target: FallbackTarget, stream: AsyncIterator[RemoteChunk], outcome: list[str]
) -> AsyncGenerator[RemoteChunk, None]:
    """The remote's messages after the first; its failure as UNAVAILABLE."""
    try:
        async for message in stream:
            if _ends(message):
                outcome[0] = "OK"
            yield message
        outcome[0] = "OK"
    except RemoteCallError as exc:
        outcome[0] = exc.code
        said = logs.clip(exc.message, _MAX_MESSAGE_CHARS)
        raise UnavailableError(
            f"{label(target)} failed during the generation: {exc.code}: {said}"
        ) from exc


class _Passed(Exception):
    """A remote error that is no breaker failure (carried out of the breaker's block)."""

    def __init__(self, error: RemoteCallError) -> None:
        super().__init__(error.message)
        self.error = error


class _Fault(ExecutorError):
    """A remote error that counts against its breaker."""

    def __init__(self, error: RemoteCallError) -> None:
        super().__init__(error.message)
        self.error = error
