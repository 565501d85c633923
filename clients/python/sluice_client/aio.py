"""The asyncio client: the same calls as ``Client``, awaited."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
import numpy.typing as npt

from sluice_api.inference import model_config_pb2
from sluice_client import _calls
from sluice_client._calls import Sampling
from sluice_client._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    RetryPolicy,
    TLSConfig,
    open_channel,
)
from sluice_client.errors import from_rpc_error
from sluice_client.results import (
    GenerateChunk,
    GenerateResult,
    HistoryEntry,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    RepositoryModel,
    ServerMetadata,
    TokenCount,
)

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of ``Client`` over ``grpc.aio``: same arguments, same results,
    same errors; ``target`` may be a ``grpc.aio.Channel`` you own."""

    def __init__(
        self,
        target: str | grpc.aio.Channel = DEFAULT_TARGET,
        *,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        admin_token: str | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self._owns_channel = isinstance(target, str)
        self._channel = (
            open_channel(
                target, tls=tls, max_message_bytes=max_message_bytes, retry=retry, aio=True
            )
            if isinstance(target, str)
            else target
        )
        self._timeout_s = timeout_s
        self._admin_token = admin_token

    async def close(self) -> None:
        """Close the channel the client opened (a channel passed in is left open)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(self, call: _calls.Call[Any, T], timeout_s: float | None) -> T:
        rpc = self._channel.unary_unary(
            call.method,
            request_serializer=_calls.serialize,
            response_deserializer=call.deserialize,
        )
        try:
            response = await rpc(
                call.request,
                timeout=self._timeout_s if timeout_s is None else timeout_s,
                metadata=call.metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return call.parse(response)

    async def _stream(
        self, call: _calls.StreamCall[Any, T], timeout_s: float | None
    ) -> AsyncGenerator[T, None]:
        rpc = self._channel.unary_stream(
            call.method,
            request_serializer=_calls.serialize,
            response_deserializer=call.deserialize,
        )
        responses = rpc(call.request, timeout=self._timeout_s if timeout_s is None else timeout_s)
        try:
            async for response in responses:
                yield call.parse(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            responses.cancel()

    async def live(self, *, timeout_s: float | None = None) -> bool:
        return await self._send(_calls.live(), timeout_s)

    async def ready(self, *, timeout_s: float | None = None) -> bool:
        return await self._send(_calls.ready(), timeout_s)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        return await self._send(_calls.health(service), timeout_s)

    async def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        return await self._send(_calls.server_metadata(), timeout_s)

    async def model_ready(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> bool:
        return await self._send(_calls.model_ready(name, version), timeout_s)

    async def model_metadata(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> ModelMetadata:
        return await self._send(_calls.model_metadata(name, version), timeout_s)

    async def model_config(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> model_config_pb2.ModelConfig:
        return await self._send(_calls.model_config(name, version), timeout_s)

    async def models(self, *, timeout_s: float | None = None) -> list[RepositoryModel]:
        return await self._send(_calls.models(), timeout_s)

    async def statistics(
        self, name: str = "", version: str = "", *, timeout_s: float | None = None
    ) -> list[ModelStatistics]:
        return await self._send(_calls.statistics(name, version), timeout_s)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> InferResult:
        call = _calls.infer(model, inputs, outputs=outputs, version=version, request_id=request_id)
        return await self._send(call, timeout_s)

    # -- model lifecycle (admin operations carry ``admin_token`` when one was given) ----

    async def load_model(
        self, model: str, *, version: str = "", reason: str = "", timeout_s: float | None = None
    ) -> list[str]:
        """Load a model (or one more version beside the serving one); the loaded versions."""
        return await self._send(
            _calls.load_model(model, version, reason, self._admin_token), timeout_s
        )

    async def unload_model(
        self, model: str, *, version: str = "", reason: str = "", timeout_s: float | None = None
    ) -> None:
        """Unload a version (or the whole model) once its in-flight calls finish."""
        return await self._send(
            _calls.unload_model(model, version, reason, self._admin_token), timeout_s
        )

    async def promote(
        self, model: str, version: str, *, reason: str = "", timeout_s: float | None = None
    ) -> tuple[str, str]:
        """Make ``version`` the serving one: (from, to)."""
        return await self._send(
            _calls.promote(model, version, reason, self._admin_token), timeout_s
        )

    async def rollback(
        self, model: str, *, reason: str = "", timeout_s: float | None = None
    ) -> tuple[str, str]:
        """Return to the version that served before the last promote: (from, to)."""
        return await self._send(_calls.rollback(model, reason, self._admin_token), timeout_s)

    async def rescan(self, *, timeout_s: float | None = None) -> tuple[list[str], list[str]]:
        """Load new models and version folders beside what serves: (loaded, failed)."""
        return await self._send(_calls.rescan(self._admin_token), timeout_s)

    async def history(self, model: str, *, timeout_s: float | None = None) -> list[HistoryEntry]:
        """The model's append-only history of changes, oldest first."""
        return await self._send(_calls.history(model), timeout_s)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelVersionStatus]:
        return await self._send(_calls.list_models(), timeout_s)

    async def count_tokens(
        self, model: str, prompt: str, *, version: str = "", timeout_s: float | None = None
    ) -> TokenCount:
        return await self._send(_calls.count_tokens(model, prompt, version), timeout_s)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        version: str = "",
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncGenerator[GenerateChunk, None]:
        """``async for chunk in client.generate(...)``; leaving the loop early, ``aclose()``
        or cancelling the task cancels the call on the server."""
        return self._stream(_calls.generate(model, prompt, version, sampling), timeout_s)

    async def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        version: str = "",
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> GenerateResult:
        chunks = self.generate(model, prompt, version=version, timeout_s=timeout_s, **sampling)
        return GenerateResult.join([chunk async for chunk in chunks])
