"""sluice.v1.ModelService: what the machine offers and what each model version runs on."""

from __future__ import annotations

from typing import Any

import grpc

from sluice.executors.capabilities import Capabilities
from sluice.service import READY, IndexEntry, InferenceService
from sluice_api.sluice.v1 import model_service_pb2 as pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_BREAKER_STATES = {
    "closed": pb.BREAKER_STATE_CLOSED,
    "half-open": pb.BREAKER_STATE_HALF_OPEN,
    "open": pb.BREAKER_STATE_OPEN,
}


def _status(row: IndexEntry, fallbacks: list[str]) -> pb.ModelVersionStatus:
    status = pb.ModelVersionStatus(
        name=row.name,
        version=row.version,
        state=pb.MODEL_STATE_READY if row.state == READY else pb.MODEL_STATE_UNAVAILABLE,
        reason=row.reason,
        fallbacks=fallbacks,
    )
    if row.loaded is not None:
        spec = row.loaded.spec
        status.backend = spec.backend
        status.backend_rung = spec.backend_rung
        status.backend_reason = spec.backend_reason
        status.device = spec.device
        status.breaker_state = _BREAKER_STATES.get(
            row.loaded.breaker.state, pb.BREAKER_STATE_UNSPECIFIED
        )
    return status


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, service: InferenceService, capabilities: Capabilities) -> None:
        self._service = service
        self._capabilities = capabilities

    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Context
    ) -> pb.GetCapabilitiesResponse:
        caps = self._capabilities
        return pb.GetCapabilitiesResponse(
            python_version=caps.python,
            torch_version=caps.torch or "",
            torch_cuda_version=caps.torch_cuda or "",
            onnxruntime_version=caps.onnxruntime or "",
            tensorrt_version=caps.tensorrt or "",
            onnxruntime_providers=caps.ort_providers,
            cuda_available=caps.cuda_available,
            cuda_devices=caps.cuda_devices,
            torch_compile_available=caps.torch_compile,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        rows = []
        for row in self._service.index():
            fallbacks = [
                (f.model or row.name)
                + (f"/{f.version}" if f.version else "")
                + (f"@{f.backend}" if f.backend else "")
                for f in self._service.fallbacks(row.name)
            ]
            rows.append(_status(row, fallbacks))
        return pb.ListModelsResponse(models=rows)
