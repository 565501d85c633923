"""inference.GRPCInferenceService: the Open Inference Protocol v2 plus Triton extensions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import __version__, callctx
from sluice.admission import AdmissionController
from sluice.errors import UnsupportedError
from sluice.policy import CallPolicy
from sluice.registry import READY, ModelRegistry
from sluice.routing import Router
from sluice.settings import Settings
from sluice.transport import convert
from sluice.transport.servicers.stream import StreamInferSession
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

EXTENSIONS = ("model_repository", "model_configuration", "statistics")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        router: Router,
        settings: Settings,
        policy: CallPolicy,
        admission: AdmissionController,
    ) -> None:
        self._registry = registry
        self._router = router
        self._settings = settings
        self._policy = policy
        self._admission = admission
        self.draining = False

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.ready and not self.draining)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = self._registry.is_ready(request.name, request.version) and not self.draining
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="sluice", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        spec = self._registry.describe(request.name, request.version)
        versions = [v for _, v, _ in self._registry.statistics(request.name)]
        return convert.model_metadata(spec, versions)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        spec = self._registry.describe(request.name, request.version)
        return pb.ModelConfigResponse(config=convert.model_config(spec))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        rows = self._registry.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(
            model_stats=[convert.model_statistics(name, v, stats) for name, v, stats in rows]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> bytes:
        domain = convert.infer_request(request)
        result = await self._router.infer(domain, callctx.call())
        context.set_trailing_metadata(
            (*(context.trailing_metadata() or ()), *convert.routing_trailers(result))
        )
        return await convert.encoded_reply(result)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        session = StreamInferSession(
            self._router,
            context,
            policy=self._policy,
            admission=self._admission,
            max_pending=self._settings.stream.max_pending_requests,
            max_pending_bytes=self._settings.stream.max_pending_bytes,
        )
        async for response in session.run(request_iterator):
            yield response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        rows = self._registry.index()
        if request.ready:
            rows = [row for row in rows if row.state == READY]
        return convert.repository_index(rows)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        # Triton's "config" (a JSON config override) and "file:<path>" (model files sent
        # inline) would change what gets loaded; accepting and ignoring them would report
        # success for a model that is not the one asked for.
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            raise UnsupportedError(
                f"RepositoryModelLoad parameter(s) {', '.join(overrides)} are not supported: "
                f"Sluice loads '{request.model_name}' only from its repository's files; "
                "change them there and load again"
            )
        await self._registry.load(
            request.model_name, who=callctx.caller.get(), reason="RepositoryModelLoad"
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._registry.unload(
            request.model_name, who=callctx.caller.get(), reason="RepositoryModelUnload"
        )
        return pb.RepositoryModelUnloadResponse()
