"""sluice.v1.GenerationService: streamed token generation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice import callctx
from sluice.admission import AdmissionController
from sluice.dataplane import DataPlane
from sluice.policy import CallPolicy
from sluice.routing import Router
from sluice.settings import Settings
from sluice.transport.generation_convert import (
    generate_response,
    generation_request,
    generation_trailers,
)
from sluice.transport.servicers.generation_session import GenerationSession
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(
        self,
        *,
        router: Router,
        plane: DataPlane,
        settings: Settings,
        policy: CallPolicy,
        admission: AdmissionController,
    ) -> None:
        self._router = router
        self._plane = plane
        self._settings = settings
        self._policy = policy
        self._admission = admission
        self._default_max_new_tokens = settings.generation.default_max_new_tokens

    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncIterator[gen.GenerateResponse]:
        domain = generation_request(request, default_max_new_tokens=self._default_max_new_tokens)
        generation = await self._router.generate(domain, callctx.call())
        marks = generation_trailers(generation)
        if marks:
            context.set_trailing_metadata((*(context.trailing_metadata() or ()), *marks))
        async with generation:
            async for chunk in generation:
                yield generate_response(generation, chunk)

    async def GenerateStream(
        self, request_iterator: AsyncIterator[gen.GenerateStreamRequest], context: Context
    ) -> AsyncIterator[gen.GenerateStreamResponse]:
        session = GenerationSession(
            self._router,
            context,
            policy=self._policy,
            admission=self._admission,
            max_running=self._settings.stream.max_pending_requests,
            default_max_new_tokens=self._default_max_new_tokens,
        )
        async for response in session.run(request_iterator):
            yield response

    async def CountTokens(
        self, request: gen.CountTokensRequest, context: Context
    ) -> gen.CountTokensResponse:
        count = await self._plane.count_tokens(
            request.model_name, request.model_version, request.prompt
        )
        return gen.CountTokensResponse(token_count=count.tokens, max_context=count.max_context)
