"""The data plane: one request on one model version, for each kind of request.

* ``infer``: tensors. Validated against the version's spec, weighed (decoded tensors and
  the reply's known size go on the call's admission ticket before anything is queued),
  decoded, queued in the version's dynamic batcher and run. A generation model's tensors
  (``text_input`` ...) are one whole-text generation on its engine instead, weighed in
  tokens and bounded by the call's deadline like any other generation.
* ``generate``: a generation on the version's engine, returned once its first chunk is made.
* ``count_tokens``: a prompt counted exactly as the model sees it.

The router decides which version a call goes to (fallbacks, retries); the data plane
resolves that version in the ``ModelTable`` and runs the request on it. Nothing here knows
about protobuf, grpc, or which class runs a model's generations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping

from sluice.clock import Clock
from sluice.dataplane.served import ServedGeneration
from sluice.dataplane.tensors import check_reply_size, decode, reply_limit
from sluice.domain import (
    Call,
    Chunk,
    GenerationRequest,
    InferRequest,
    InferResult,
    OutputTensor,
    TokenCount,
)
from sluice.errors import (
    DeadlineExceededError,
    ExecutorError,
    RequestCancelledError,
    SluiceError,
    UnsupportedError,
)
from sluice.generation.engine import GenerationEngine, TokenStream
from sluice.generation.text import generate_text, text_request
from sluice.loader import ModelVersion
from sluice.metrics import Metrics
from sluice.registry.table import ModelTable
from sluice.settings import Settings
from sluice.tensors import (
    Array,
    check_inputs,
    check_requested_outputs,
    decode_inputs,
    expected_reply_bytes,
    reply_size,
)
from sluice.tracing import Tracing


class DataPlane:
    def __init__(
        self,
        table: ModelTable,
        settings: Settings,
        *,
        metrics: Metrics,
        clock: Clock,
        tracing: Tracing | None = None,
    ) -> None:
        self._table = table
        self._metrics = metrics
        self._clock = clock
        self._tracing = tracing or Tracing.off()
        self._default_max_new_tokens = settings.generation.default_max_new_tokens
        self._reply_limit = reply_limit(settings.max_message_bytes)

    # -- tensors ------------------------------------------------------------------------

    async def infer(self, request: InferRequest, call: Call) -> InferResult:
        """The outputs of one tensor request on the version it names (``request.backend``:
        that backend of it)."""
        model = self._table.get(request.model, request.version, backend=request.backend)
        io = model.spec.io
        checked = check_inputs(request, io)
        wanted = check_requested_outputs(request, io)
        reply_bytes = expected_reply_bytes(io, wanted, checked.rows)
        check_reply_size(reply_bytes, self._reply_limit, model.spec.name, known=True)
        if call.ticket is not None:
            call.ticket.need(work_bytes=checked.decoded_bytes + reply_bytes)
        inputs = await decode(request, checked)
        started = self._clock()
        model.enter()
        try:
            outputs = await self._run(model, inputs, call)
            size = reply_size(outputs[name] for name in wanted)
            check_reply_size(size, self._reply_limit, model.spec.name, known=False)
        except BaseException:
            model.stats.record_end(ok=False, seconds=self._clock() - started)
            raise
        finally:
            model.leave()
        model.stats.record_end(ok=True, seconds=self._clock() - started)
        datatypes = {spec.name: spec.datatype for spec in io.outputs}
        return InferResult(
            model=model.spec.name,
            version=model.spec.version,
            backend=model.spec.backend,
            id=request.id,
            outputs=[OutputTensor(name, datatypes[name], outputs[name]) for name in wanted],
        )

    def _run(
        self, model: ModelVersion, inputs: Mapping[str, Array], call: Call
    ) -> Awaitable[dict[str, Array]]:
        """Tensors through the version's batcher; a generation model's through its engine."""
        if model.engine is None:
            return model.batcher.infer(inputs, deadline=call.deadline, priority=call.priority)
        return self._whole_text(model, model.engine, inputs, call)

    async def _whole_text(
        self,
        model: ModelVersion,
        engine: GenerationEngine,
        inputs: Mapping[str, Array],
        call: Call,
    ) -> dict[str, Array]:
        """A generation model's tensors: one whole-text generation, weighed in tokens."""
        started = self._clock()
        with model.breaker.calling():
            outputs = await generate_text(
                engine,
                inputs,
                default_max_new_tokens=self._default_max_new_tokens,
                deadline=call.deadline,
                ticket=call.ticket,
            )
        model.stats.record_unbatched(queue_s=0.0, infer_s=self._clock() - started)
        return outputs

    def generates(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (``version``) is a generation model that is loaded."""
        try:
            return self._table.get(name, version, healthy=False).engine is not None
        except SluiceError:
            return False

    def text_generation(self, request: InferRequest) -> tuple[GenerationRequest, bool]:
        """A generation model's tensor request (``text_input``, ``max_tokens``, ...) as a
        generation request, and whether the caller asked for a stream of chunks."""
        model = self._table.get(request.model, request.version, healthy=False)
        inputs = decode_inputs(request, model.spec.io)
        text = text_request(inputs, default_max_new_tokens=self._default_max_new_tokens)
        generation = GenerationRequest(
            model=request.model,
            version=request.version,
            prompt=text.prompt,
            params=text.params,
            id=request.id,
        )
        return generation, text.stream

    # -- generations --------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, call: Call, *, first_token_s: float | None = None
    ) -> ServedGeneration:
        """Start a generation on the version it names and wait for its first chunk, at most
        ``first_token_s`` (None: the call's deadline bounds it). Its prompt's tokens plus
        ``max_new_tokens`` go on the call's ticket before it is queued. A version that makes
        no first token in time counts against its breaker."""
        model = self._table.get(request.model, request.version, backend=request.backend)
        engine = _engine(model)
        model.enter()  # an unload of this version waits until the generation ends
        try:
            return await self._start(model, engine, request, call, first_token_s)
        except BaseException:
            model.leave()
            raise

    async def _start(
        self,
        model: ModelVersion,
        engine: GenerationEngine,
        request: GenerationRequest,
        call: Call,
        first_token_s: float | None,
    ) -> ServedGeneration:
        started = self._clock()
        prompt_ids = await engine.encode(request.prompt)
        engine.check_fits(len(prompt_ids), request.params.max_new_tokens)
        if call.ticket is not None:
            call.ticket.need(tokens=len(prompt_ids) + request.params.max_new_tokens)
        stream = engine.submit(
            prompt_ids, request.params, deadline=call.deadline, priority=call.priority
        )
        try:
            with (
                self._tracing.prefill_span(
                    model=request.model, version=model.spec.version, prompt_tokens=len(prompt_ids)
                ),
                model.breaker.calling(),
            ):
                first = await self._first_chunk(stream, request.model, first_token_s, call)
        except BaseException:
            await stream.aclose()  # the engine drops the sequence at its next step
            raise
        return ServedGeneration(
            stream,
            first,
            model.spec,
            stats=model.stats,
            on_end=model.leave,
            observer=self._metrics.generation_observer(request.model),
            decode_span=self._tracing.decode_span(model=request.model, version=model.spec.version),
            clock=self._clock,
            started=started,
        )

    async def _first_chunk(
        self, stream: TokenStream, model: str, budget_s: float | None, call: Call
    ) -> Chunk:
        try:
            async with asyncio.timeout(budget_s):
                first = await anext(stream, None)
        except TimeoutError as exc:  # inside the breaker: a backend fault
            if call.deadline is not None and self._clock() >= call.deadline:
                raise DeadlineExceededError(
                    f"the call's deadline passed before model '{model}' made its first token"
                ) from exc
            raise ExecutorError(
                f"model '{model}' made no first token within this attempt's "
                f"{budget_s or 0:.3f}s share of the deadline"
            ) from exc
        if first is None:
            raise RequestCancelledError("the generation was cancelled before its first token")
        return first

    # -- tokens -------------------------------------------------------------------------

    async def count_tokens(self, name: str, version: str, prompt: str) -> TokenCount:
        """The prompt's tokens as the model sees them, and the model's context."""
        engine = _engine(self._table.get(name, version))
        return TokenCount(tokens=len(await engine.encode(prompt)), max_context=engine.max_context)


def _engine(model: ModelVersion) -> GenerationEngine:
    if model.engine is None:
        raise UnsupportedError(
            f"model '{model.spec.name}' does not generate text (it is a {model.spec.backend} "
            "tensor model); call ModelInfer"
        )
    return model.engine
