"""Generation models over ModelStreamInfer, as Triton's decoupled models answer.

The request carries Triton's generation tensors (``text_input``, optional ``max_tokens``,
``stream``, sampling inputs); with ``stream`` true each chunk is one response with its
``text_output``, otherwise one response holds the whole text. Every response carries the
``triton_final_response`` parameter, true on the last; a request with the
``triton_enable_empty_final_response`` parameter gets the flag on an extra, empty response
instead, as Triton sends it. So ``perf_analyzer --streaming`` and tritonclient's streaming
API work unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from sluice import callctx
from sluice.admission import Ticket
from sluice.dataplane import Generation
from sluice.domain import InferResult, OutputTensor
from sluice.errors import SluiceError
from sluice.generation.text import TEXT_OUTPUT, text_output
from sluice.transport import convert
from sluice.transport.status import message_for
from sluice_api.inference import grpc_service_pb2 as pb

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"

#: What a stream writes for one request: a response, or the error that ends the call.
Reply = pb.ModelStreamInferResponse | SluiceError


def error_reply(request: pb.ModelInferRequest, exc: SluiceError, *, grpc_errors: bool) -> Reply:
    """A failed request: its error as a response (the stream goes on), or, with the
    ``triton_grpc_error`` header, the error that ends the call with its status."""
    if grpc_errors:
        return exc
    return pb.ModelStreamInferResponse(
        error_message=message_for(exc, callctx.request_id.get()),
        infer_response=pb.ModelInferResponse(
            id=request.id, model_name=request.model_name, model_version=request.model_version
        ),
    )


class DecoupledReplies:
    """The responses to one generation request: ``replies()`` once, or ``close()``."""

    def __init__(
        self,
        generation: Generation,
        request: pb.ModelInferRequest,
        *,
        stream: bool,
        ticket: Ticket,
        grpc_errors: bool,
    ) -> None:
        self._generation = generation
        self._request = request
        self._stream = stream
        self._ticket = ticket
        self._grpc_errors = grpc_errors
        flag = request.parameters.get(EMPTY_FINAL)
        self._empty_final = flag is not None and flag.bool_param

    async def close(self) -> None:
        """End a generation whose responses will never be written."""
        try:
            async with self._generation:
                self._generation.cancel()
        finally:
            self._ticket.release()

    async def replies(self) -> AsyncGenerator[Reply, None]:
        """The responses, in order (iterate once; close the iterator if you stop early)."""
        generation = self._generation
        try:
            async with generation:
                if self._stream:
                    async for chunk in generation:
                        yield self._response(chunk.text, final=chunk.finish_reason is not None)
                else:
                    text = "".join([chunk.text async for chunk in generation])
                    yield self._response(text, final=True)
            if self._empty_final:
                yield self._flag_only()
        except SluiceError as exc:
            yield error_reply(self._request, exc, grpc_errors=self._grpc_errors)
        finally:
            self._ticket.release()

    def _response(self, text: str, *, final: bool) -> pb.ModelStreamInferResponse:
        spec = self._generation.spec
        result = InferResult(
            model=spec.name,
            version=spec.version,
            backend=spec.backend,
            id=self._request.id,
            outputs=[OutputTensor(TEXT_OUTPUT, "BYTES", text_output(text))],
        )
        response = convert.infer_response(result)
        response.parameters[FINAL].bool_param = final and not self._empty_final
        if self._generation.degraded:  # a degraded answer is never silent
            response.parameters["sluice_degraded"].string_param = self._generation.degraded
        if self._generation.cached:
            response.parameters["sluice_cache_hit"].bool_param = True
        if self._generation.endpoint:
            response.parameters["sluice_endpoint"].string_param = self._generation.endpoint
        return pb.ModelStreamInferResponse(infer_response=response)

    def _flag_only(self) -> pb.ModelStreamInferResponse:
        spec = self._generation.spec
        response = pb.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=self._request.id
        )
        response.parameters[FINAL].bool_param = True
        return pb.ModelStreamInferResponse(infer_response=response)
