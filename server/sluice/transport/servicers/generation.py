"""sluice.v1.GenerationService: streamed token generation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.admission import AdmissionController
from sluice.deadlines import DeadlinePolicy
from sluice.routing import Router
from sluice.service import InferenceService
from sluice.settings import Settings
from sluice.transport import callctx
from sluice.transport.generation_convert import generate_response, generation_request
from sluice.transport.servicers.generation_session import GenerationSession
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(
        self,
        service: InferenceService,
        *,
        router: Router,
        settings: Settings,
        admission: AdmissionController,
        deadlines: DeadlinePolicy,
    ) -> None:
        self._service = service
        self._router = router
        self._settings = settings
        self._admission = admission
        self._deadlines = deadlines
        self._default_max_new_tokens = settings.generation.default_max_new_tokens

    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncIterator[gen.GenerateResponse]:
        domain = generation_request(request, default_max_new_tokens=self._default_max_new_tokens)
        generation = await self._router.generate(
            domain, deadline=callctx.deadline.get(), ticket=callctx.ticket.get()
        )
        async with generation:
            async for chunk in generation:
                yield generate_response(generation, chunk)

    async def GenerateStream(
        self, request_iterator: AsyncIterator[gen.GenerateStreamRequest], context: Context
    ) -> AsyncIterator[gen.GenerateStreamResponse]:
        session = GenerationSession(
            self._router,
            context,
            admission=self._admission,
            deadlines=self._deadlines,
            max_running=self._settings.stream.max_pending_requests,
            tenant_key=self._settings.admission.tenant_metadata_key,
            default_max_new_tokens=self._default_max_new_tokens,
        )
        async for response in session.run(request_iterator):
            yield response

    async def CountTokens(
        self, request: gen.CountTokensRequest, context: Context
    ) -> gen.CountTokensResponse:
        model = self._service.generation_model(request.model_name, request.model_version)
        assert model.generator is not None
        count = len(await model.generator.encode_prompt(request.prompt))
        return gen.CountTokensResponse(token_count=count, max_context=model.generator.max_context)
