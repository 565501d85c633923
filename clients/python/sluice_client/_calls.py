"""Every client call as data: the method, its request, and how to read its response.

The sync and asyncio clients share all of this; they differ only in how they send a
``Call`` or a ``StreamCall`` (``Client`` blocks, ``AsyncClient`` awaits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

import numpy as np
import numpy.typing as npt

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import model_config_pb2
from sluice_api.sluice.v1 import generation_service_pb2 as gen_pb
from sluice_api.sluice.v1 import model_service_pb2 as model_pb
from sluice_client import _health
from sluice_client._channel import GENERATION_SERVICE, INFERENCE_SERVICE, MODEL_SERVICE
from sluice_client.names import REQUEST_ID_KEY
from sluice_client.results import (
    BatchStats,
    DurationStat,
    GenerateChunk,
    HistoryEntry,
    InferenceStats,
    InferResult,
    LatencyGuardrail,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    RepositoryModel,
    ServerMetadata,
    TensorMetadata,
    TokenCount,
    Usage,
)
from sluice_client.tensors import WireFormatError, datatype_of, from_raw, to_raw

ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class Call(Generic[ResponseT, ResultT]):
    """One unary call: full method path, request message, response decoder, and the parser
    that turns the response into what the client method returns."""

    method: str
    request: Any
    deserialize: Callable[[bytes], ResponseT]
    parse: Callable[[ResponseT], ResultT]
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StreamCall(Generic[ResponseT, ResultT]):
    """One server-streaming call: each response message is parsed into one result."""

    method: str
    request: Any
    deserialize: Callable[[bytes], ResponseT]
    parse: Callable[[ResponseT], ResultT]


class Sampling(TypedDict, total=False):
    """How a generation picks its tokens (sluice.v1.SamplingParameters); unset is the
    server's default: 16 new tokens, greedy, no top-k / top-p, no stop sequences."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_sequences: Sequence[str]
    stop_token_ids: Sequence[int]
    repetition_penalty: float


def serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _inference(method: str) -> str:
    return f"/{INFERENCE_SERVICE}/{method}"


def live() -> Call[pb.ServerLiveResponse, bool]:
    return Call(
        _inference("ServerLive"),
        pb.ServerLiveRequest(),
        pb.ServerLiveResponse.FromString,
        lambda r: r.live,
    )


def ready() -> Call[pb.ServerReadyResponse, bool]:
    return Call(
        _inference("ServerReady"),
        pb.ServerReadyRequest(),
        pb.ServerReadyResponse.FromString,
        lambda r: r.ready,
    )


def health(service: str) -> Call[Any, str]:
    return Call(
        _health.CHECK_METHOD,
        _health.HealthCheckRequest(service=service),
        _health.HealthCheckResponse.FromString,
        _health.status_name,
    )


def server_metadata() -> Call[pb.ServerMetadataResponse, ServerMetadata]:
    return Call(
        _inference("ServerMetadata"),
        pb.ServerMetadataRequest(),
        pb.ServerMetadataResponse.FromString,
        lambda r: ServerMetadata(name=r.name, version=r.version, extensions=list(r.extensions)),
    )


def model_ready(name: str, version: str) -> Call[pb.ModelReadyResponse, bool]:
    return Call(
        _inference("ModelReady"),
        pb.ModelReadyRequest(name=name, version=version),
        pb.ModelReadyResponse.FromString,
        lambda r: r.ready,
    )


def model_metadata(name: str, version: str) -> Call[pb.ModelMetadataResponse, ModelMetadata]:
    return Call(
        _inference("ModelMetadata"),
        pb.ModelMetadataRequest(name=name, version=version),
        pb.ModelMetadataResponse.FromString,
        _model_metadata,
    )


def model_config(
    name: str, version: str
) -> Call[pb.ModelConfigResponse, model_config_pb2.ModelConfig]:
    return Call(
        _inference("ModelConfig"),
        pb.ModelConfigRequest(name=name, version=version),
        pb.ModelConfigResponse.FromString,
        lambda r: r.config,
    )


def models() -> Call[pb.RepositoryIndexResponse, list[RepositoryModel]]:
    return Call(
        _inference("RepositoryIndex"),
        pb.RepositoryIndexRequest(),
        pb.RepositoryIndexResponse.FromString,
        lambda r: [RepositoryModel(m.name, m.version, m.state, m.reason) for m in r.models],
    )


def statistics(name: str, version: str) -> Call[pb.ModelStatisticsResponse, list[ModelStatistics]]:
    return Call(
        _inference("ModelStatistics"),
        pb.ModelStatisticsRequest(name=name, version=version),
        pb.ModelStatisticsResponse.FromString,
        lambda r: [_model_statistics(s) for s in r.model_stats],
    )


def infer(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    *,
    outputs: Sequence[str] | None,
    version: str,
    request_id: str,
) -> Call[pb.ModelInferResponse, InferResult]:
    """Inputs travel as raw contents with the datatype their numpy dtype implies."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(to_raw(array, datatype))
    for name in outputs or ():
        request.outputs.add(name=name)
    metadata = ((REQUEST_ID_KEY, request_id),) if request_id else ()
    return Call(
        _inference("ModelInfer"),
        request,
        pb.ModelInferResponse.FromString,
        _infer_result,
        metadata,
    )


def list_models() -> Call[model_pb.ListModelsResponse, list[ModelVersionStatus]]:
    return Call(
        f"/{MODEL_SERVICE}/ListModels",
        model_pb.ListModelsRequest(),
        model_pb.ListModelsResponse.FromString,
        lambda r: [_model_version_status(m) for m in r.models],
    )


def count_tokens(
    model: str, prompt: str, version: str
) -> Call[gen_pb.CountTokensResponse, TokenCount]:
    return Call(
        f"/{GENERATION_SERVICE}/CountTokens",
        gen_pb.CountTokensRequest(model_name=model, model_version=version, prompt=prompt),
        gen_pb.CountTokensResponse.FromString,
        lambda r: TokenCount(token_count=r.token_count, max_context=r.max_context),
    )


def generate(
    model: str, prompt: str, version: str, sampling: Sampling
) -> StreamCall[gen_pb.GenerateResponse, GenerateChunk]:
    request = gen_pb.GenerateRequest(
        model_name=model,
        model_version=version,
        prompt=prompt,
        parameters=gen_pb.SamplingParameters(**sampling),
    )
    return StreamCall(
        f"/{GENERATION_SERVICE}/Generate",
        request,
        gen_pb.GenerateResponse.FromString,
        _generate_chunk,
    )


def _enum_name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _model_version_status(m: model_pb.ModelVersionStatus) -> ModelVersionStatus:
    return ModelVersionStatus(
        name=m.name,
        version=m.version,
        state=_enum_name(m.state, model_pb.ModelState, "MODEL_STATE_"),
        reason=m.reason,
        backend=m.backend,
        backend_rung=m.backend_rung,
        backend_reason=m.backend_reason,
        device=m.device,
        breaker_state=_enum_name(m.breaker_state, model_pb.BreakerState, "BREAKER_STATE_"),
        fallbacks=list(m.fallbacks),
        serving=m.serving,
        latency_guardrail=_latency_guardrail(m.latency_guardrail)
        if m.HasField("latency_guardrail")
        else None,
    )


def _latency_guardrail(g: model_pb.LatencyGuardrailStatus) -> LatencyGuardrail:
    return LatencyGuardrail(
        guardrail_ms=g.guardrail_ms,
        tripped=g.tripped,
        p95_ms=g.p95_ms,
        samples=g.samples,
        slow_calls=g.slow_calls,
    )


def _generate_chunk(r: gen_pb.GenerateResponse) -> GenerateChunk:
    reason = r.finish_reason
    return GenerateChunk(
        text=r.text,
        token_ids=list(r.token_ids),
        finish_reason=(
            None
            if reason == gen_pb.FINISH_REASON_UNSPECIFIED
            else _enum_name(reason, gen_pb.FinishReason, "FINISH_REASON_").lower()
        ),
        usage=(
            Usage(r.usage.prompt_tokens, r.usage.completion_tokens) if r.HasField("usage") else None
        ),
        model=r.model_name,
        version=r.model_version,
        fallback_reason=r.fallback_reason,
    )


def _tensor(t: pb.ModelMetadataResponse.TensorMetadata) -> TensorMetadata:
    return TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))


def _model_metadata(r: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=r.name,
        versions=list(r.versions),
        platform=r.platform,
        inputs=[_tensor(t) for t in r.inputs],
        outputs=[_tensor(t) for t in r.outputs],
    )


def _duration(d: pb.StatisticDuration) -> DurationStat:
    return DurationStat(count=d.count, ns=d.ns)


def _model_statistics(s: pb.ModelStatistics) -> ModelStatistics:
    i = s.inference_stats
    return ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference_ms=s.last_inference,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=InferenceStats(
            success=_duration(i.success),
            fail=_duration(i.fail),
            queue=_duration(i.queue),
            compute_input=_duration(i.compute_input),
            compute_infer=_duration(i.compute_infer),
            compute_output=_duration(i.compute_output),
        ),
        batch_stats=[
            BatchStats(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for b in s.batch_stats
        ],
    )


def _infer_result(r: pb.ModelInferResponse) -> InferResult:
    raw = r.raw_output_contents
    if len(raw) != len(r.outputs):
        raise WireFormatError(
            f"the response has {len(raw)} raw_output_contents for {len(r.outputs)} outputs; "
            "this client reads raw output contents only"
        )
    return InferResult(
        model=r.model_name,
        version=r.model_version,
        id=r.id,
        outputs={
            t.name: from_raw(data, t.datatype, tuple(t.shape))
            for t, data in zip(r.outputs, raw, strict=True)
        },
        datatypes={t.name: t.datatype for t in r.outputs},
    )


def _admin(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def load_model(
    model: str, version: str, reason: str, token: str | None
) -> Call[model_pb.LoadModelResponse, list[str]]:
    return Call(
        f"/{MODEL_SERVICE}/LoadModel",
        model_pb.LoadModelRequest(model_name=model, version=version, reason=reason),
        model_pb.LoadModelResponse.FromString,
        lambda r: list(r.versions),
        _admin(token),
    )


def unload_model(
    model: str, version: str, reason: str, token: str | None
) -> Call[model_pb.UnloadModelResponse, None]:
    return Call(
        f"/{MODEL_SERVICE}/UnloadModel",
        model_pb.UnloadModelRequest(model_name=model, version=version, reason=reason),
        model_pb.UnloadModelResponse.FromString,
        lambda r: None,
        _admin(token),
    )


def promote(
    model: str, version: str, reason: str, token: str | None
) -> Call[model_pb.PromoteModelResponse, tuple[str, str]]:
    return Call(
        f"/{MODEL_SERVICE}/PromoteModel",
        model_pb.PromoteModelRequest(model_name=model, version=version, reason=reason),
        model_pb.PromoteModelResponse.FromString,
        lambda r: (r.from_version, r.to_version),
        _admin(token),
    )


def rollback(
    model: str, reason: str, token: str | None
) -> Call[model_pb.RollbackModelResponse, tuple[str, str]]:
    return Call(
        f"/{MODEL_SERVICE}/RollbackModel",
        model_pb.RollbackModelRequest(model_name=model, reason=reason),
        model_pb.RollbackModelResponse.FromString,
        lambda r: (r.from_version, r.to_version),
        _admin(token),
    )


def history(model: str) -> Call[model_pb.GetModelHistoryResponse, list[HistoryEntry]]:
    return Call(
        f"/{MODEL_SERVICE}/GetModelHistory",
        model_pb.GetModelHistoryRequest(model_name=model),
        model_pb.GetModelHistoryResponse.FromString,
        lambda r: [
            HistoryEntry(e.time, e.action, e.from_version, e.to_version, e.who, e.reason)
            for e in r.entries
        ],
    )


def rescan(
    token: str | None,
) -> Call[model_pb.RescanRepositoryResponse, tuple[list[str], list[str]]]:
    return Call(
        f"/{MODEL_SERVICE}/RescanRepository",
        model_pb.RescanRepositoryRequest(),
        model_pb.RescanRepositoryResponse.FromString,
        lambda r: (list(r.loaded), list(r.failed)),
        _admin(token),
    )
