"""Calls to remote candidates over the Open Inference Protocol gRPC API
(``inference.GRPCInferenceService``): one pooled channel per endpoint and TLS setting, opened
at the first call and closed at shutdown. The policy (breakers, limits, what an error means)
is ``sluice.routing.remote``'s; this module converts and calls.

A request goes out as it came in: raw inputs stay raw, typed contents stay typed, its
parameters of plain types travel along. A reply comes back as the remote sent it, refused
when larger than ``remote.max_reply_bytes`` (the channel's receive limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sluice.domain import (
    NO_TOKEN,
    Chunk,
    FinishReason,
    GenerationRequest,
    InferRequest,
    InferResult,
    InputTensor,
    OutputTensor,
    SamplingParams,
)
from sluice.routing.generations import RemoteChunk, Served
from sluice.routing.remote import REMOTE_BACKEND, RemoteCallError
from sluice.settings import FallbackTarget, RemoteTLS, Settings
from sluice.transport.convert import TYPED_FIELD
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from sluice_client.tensors import from_raw

_TLSKey = tuple[Path | None, Path | None, Path | None, str]


class OutboundChannels:
    """The ``RemoteClient`` of the server: pooled channels to remote endpoints."""

    def __init__(self, settings: Settings) -> None:
        self._options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", settings.remote.max_reply_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        self._max_reply_bytes = settings.remote.max_reply_bytes
        self._channels: dict[tuple[str, _TLSKey | None], grpc.aio.Channel] = {}
        self._opening: asyncio.Lock = asyncio.Lock()

    async def _channel(self, target: FallbackTarget) -> grpc.aio.Channel:
        tls = target.tls
        key = (target.endpoint, _tls_key(tls) if tls is not None else None)
        channel = self._channels.get(key)
        if channel is not None:
            return channel
        async with self._opening:  # one channel per key, however many calls arrive at once
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = await self._open(target.endpoint, tls)
        return channel

    async def _stub(self, target: FallbackTarget) -> pb_grpc.GRPCInferenceServiceStub:
        channel = await self._channel(target)
        return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

    async def _open(self, endpoint: str, tls: RemoteTLS | None) -> grpc.aio.Channel:
        if tls is None:
            return grpc.aio.insecure_channel(endpoint, options=self._options)
        try:
            credentials = await asyncio.to_thread(_credentials, tls)
        except OSError as exc:
            raise RemoteCallError("UNAVAILABLE", f"cannot read its TLS files: {exc}") from exc
        options = list(self._options)
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(endpoint, credentials, options=options)

    async def infer(
        self,
        target: FallbackTarget,
        request: InferRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> InferResult:
        stub = await self._stub(target)
        message = _request(target, request)
        try:
            response = await stub.ModelInfer(message, timeout=timeout_s, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc, self._max_reply_bytes) from exc
        return _result(target, request, response)

    async def generate(
        self,
        target: FallbackTarget,
        request: GenerationRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> AsyncGenerator[RemoteChunk, None]:
        channel = await self._channel(target)
        stub = gen_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        message = gen.GenerateRequest(
            model_name=target.model,
            model_version=target.version,
            prompt=request.prompt,
            parameters=_sampling(request.params),
        )
        call = stub.Generate(message, timeout=timeout_s, metadata=tuple(metadata))
        try:
            async for response in call:
                yield _remote_chunk(target, response)
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc, self._max_reply_bytes) from exc
        finally:
            call.cancel()

    async def ready(self, target: FallbackTarget, *, timeout_s: float) -> bool:
        stub = await self._stub(target)
        message = pb.ModelReadyRequest(name=target.model, version=target.version)
        try:
            response = await stub.ModelReady(message, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc, self._max_reply_bytes) from exc
        return bool(response.ready)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _tls_key(tls: RemoteTLS) -> _TLSKey:
    return (tls.ca_file, tls.cert_file, tls.key_file, tls.server_name)


def _credentials(tls: RemoteTLS) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file),
        private_key=read(tls.key_file),
        certificate_chain=read(tls.cert_file),
    )


def _call_error(exc: grpc.aio.AioRpcError, max_reply_bytes: int) -> RemoteCallError:
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return RemoteCallError(
            "REPLY_TOO_LARGE",
            f"its reply is larger than remote.max_reply_bytes ({max_reply_bytes}): {details}",
        )
    return RemoteCallError(exc.code().name, details)


def _request(target: FallbackTarget, request: InferRequest) -> pb.ModelInferRequest:
    """The caller's request as the remote model's: its inputs as they arrived."""
    message = pb.ModelInferRequest(
        model_name=target.model, model_version=target.version, id=request.id
    )
    raw = all(tensor.raw is not None for tensor in request.inputs)
    for tensor in request.inputs:
        sent = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            message.raw_input_contents.append(tensor.raw or b"")
        else:
            _fill_contents(sent, tensor)
    for name in request.outputs:
        message.outputs.add(name=name)
    for key, value in request.parameters.items():
        _set_parameter(message.parameters[key], value)
    return message


def _fill_contents(sent: pb.ModelInferRequest.InferInputTensor, tensor: InputTensor) -> None:
    field = TYPED_FIELD.get(tensor.datatype)
    if field is not None and tensor.values is not None:
        getattr(sent.contents, field).extend(tensor.values)


def _set_parameter(parameter: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value


def _result(
    target: FallbackTarget, request: InferRequest, response: pb.ModelInferResponse
) -> InferResult:
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise RemoteCallError(
            "INTERNAL",
            f"its reply has {len(raw)} raw_output_contents for {len(response.outputs)} outputs",
        )
    outputs = []
    for index, tensor in enumerate(response.outputs):
        shape = tuple(int(d) for d in tensor.shape)
        try:
            array = (
                from_raw(raw[index], tensor.datatype, shape)
                if raw
                else _typed_output(tensor, shape)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteCallError(
                "INTERNAL", f"its output '{tensor.name[:200]}' does not decode: {exc}"
            ) from exc
        outputs.append(OutputTensor(name=tensor.name, datatype=tensor.datatype, array=array))
    return InferResult(
        model=response.model_name or target.model,
        version=response.model_version,
        id=response.id or request.id,
        outputs=outputs,
    )


def _typed_output(
    tensor: pb.ModelInferResponse.InferOutputTensor, shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    field = TYPED_FIELD[tensor.datatype]
    values = list(getattr(tensor.contents, field))
    if tensor.datatype == "BYTES":
        return np.array(values, dtype=object).reshape(shape)
    return np.array(values, dtype=from_raw(b"", tensor.datatype, (0,)).dtype).reshape(shape)


_FINISH_REASONS = {
    gen.FINISH_REASON_STOP: FinishReason.STOP,
    gen.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    gen.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}


def _sampling(params: SamplingParams) -> gen.SamplingParameters:
    """The caller's sampling parameters, every one, for the remote."""
    message = gen.SamplingParameters(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        stop_sequences=params.stop_sequences,
        stop_token_ids=params.stop_token_ids,
        repetition_penalty=params.repetition_penalty,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def _remote_chunk(target: FallbackTarget, response: gen.GenerateResponse) -> RemoteChunk:
    """One remote message as chunks: one per token (the text on the first), the finish
    reason on the last."""
    if response.finish_reason == gen.FINISH_REASON_ERROR:
        raise RemoteCallError("INTERNAL", "its generation ended with FINISH_REASON_ERROR")
    reason = _FINISH_REASONS.get(response.finish_reason)
    ids = list(response.token_ids) or [NO_TOKEN]
    last = len(ids) - 1
    chunks = tuple(
        Chunk(response.text if i == 0 else "", token, reason if i == last else None)
        for i, token in enumerate(ids)
    )
    served = Served(response.model_name or target.model, response.model_version, REMOTE_BACKEND)
    prompt_tokens = response.usage.prompt_tokens if response.HasField("usage") else None
    return RemoteChunk(served, chunks, prompt_tokens)
