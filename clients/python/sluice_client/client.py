"""The blocking client."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
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


class Client:
    """A blocking client for a Sluice (or any Open Inference Protocol v2) server.

    ``target`` is ``"host:port"`` (a channel with raised message limits and retries on
    UNAVAILABLE is opened, and closed with the client: plaintext, or TLS with ``tls``, a
    ``TLSConfig`` naming the CA, the client certificate and key for mTLS, and a server-name
    override) or a ``grpc.Channel`` you own and configure. Every call has a deadline:
    ``timeout_s`` here, or the call's own ``timeout_s``. Failed calls raise
    ``SluiceClientError`` subclasses.
    """

    def __init__(
        self,
        target: str | grpc.Channel = DEFAULT_TARGET,
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
                target, tls=tls, max_message_bytes=max_message_bytes, retry=retry, aio=False
            )
            if isinstance(target, str)
            else target
        )
        self._timeout_s = timeout_s
        self._admin_token = admin_token

    def close(self) -> None:
        """Close the channel the client opened (a channel passed in is left open)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: _calls.Call[Any, T], timeout_s: float | None) -> T:
        rpc = self._channel.unary_unary(
            call.method,
            request_serializer=_calls.serialize,
            response_deserializer=call.deserialize,
        )
        try:
            response = rpc(
                call.request,
                timeout=self._timeout_s if timeout_s is None else timeout_s,
                metadata=call.metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return call.parse(response)

    def _stream(
        self, call: _calls.StreamCall[Any, T], timeout_s: float | None
    ) -> Generator[T, None, None]:
        rpc = self._channel.unary_stream(
            call.method,
            request_serializer=_calls.serialize,
            response_deserializer=call.deserialize,
        )
        responses = rpc(call.request, timeout=self._timeout_s if timeout_s is None else timeout_s)
        try:
            for response in responses:
                yield call.parse(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            responses.cancel()

    def live(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server process is up."""
        return self._send(_calls.live(), timeout_s)

    def ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server can serve inference (start-up done, not draining)."""
        return self._send(_calls.ready(), timeout_s)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" is the whole server;
        Sluice names each model's service ``sluice.model.<name>``)."""
        return self._send(_calls.health(service), timeout_s)

    def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        return self._send(_calls.server_metadata(), timeout_s)

    def model_ready(self, name: str, version: str = "", *, timeout_s: float | None = None) -> bool:
        return self._send(_calls.model_ready(name, version), timeout_s)

    def model_metadata(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> ModelMetadata:
        return self._send(_calls.model_metadata(name, version), timeout_s)

    def model_config(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> model_config_pb2.ModelConfig:
        """The model's Triton-style configuration, as the protobuf ModelConfig."""
        return self._send(_calls.model_config(name, version), timeout_s)

    def models(self, *, timeout_s: float | None = None) -> list[RepositoryModel]:
        """Every model in the server's repository, one row per version, with its state."""
        return self._send(_calls.models(), timeout_s)

    def statistics(
        self, name: str = "", version: str = "", *, timeout_s: float | None = None
    ) -> list[ModelStatistics]:
        """Per-version statistics; no name means every loaded model."""
        return self._send(_calls.statistics(name, version), timeout_s)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run one inference. Each input's datatype follows its numpy dtype (arrays of
        ``bytes`` / ``str`` are BYTES); ``outputs`` picks outputs (default: all);
        ``request_id`` is echoed back and names the call in the server's logs."""
        call = _calls.infer(model, inputs, outputs=outputs, version=version, request_id=request_id)
        return self._send(call, timeout_s)

    # -- model lifecycle (admin operations carry ``admin_token`` when one was given) ----

    def load_model(
        self, model: str, *, version: str = "", reason: str = "", timeout_s: float | None = None
    ) -> list[str]:
        """Load a model (or one more version beside the serving one); the loaded versions."""
        return self._send(_calls.load_model(model, version, reason, self._admin_token), timeout_s)

    def unload_model(
        self, model: str, *, version: str = "", reason: str = "", timeout_s: float | None = None
    ) -> None:
        """Unload a version (or the whole model) once its in-flight calls finish."""
        return self._send(_calls.unload_model(model, version, reason, self._admin_token), timeout_s)

    def promote(
        self, model: str, version: str, *, reason: str = "", timeout_s: float | None = None
    ) -> tuple[str, str]:
        """Make ``version`` the serving one: (from, to)."""
        return self._send(_calls.promote(model, version, reason, self._admin_token), timeout_s)

    def rollback(
        self, model: str, *, reason: str = "", timeout_s: float | None = None
    ) -> tuple[str, str]:
        """Return to the version that served before the last promote: (from, to)."""
        return self._send(_calls.rollback(model, reason, self._admin_token), timeout_s)

    def rescan(self, *, timeout_s: float | None = None) -> tuple[list[str], list[str]]:
        """Load new models and version folders beside what serves: (loaded, failed)."""
        return self._send(_calls.rescan(self._admin_token), timeout_s)

    def history(self, model: str, *, timeout_s: float | None = None) -> list[HistoryEntry]:
        """The model's append-only history of changes, oldest first."""
        return self._send(_calls.history(model), timeout_s)

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelVersionStatus]:
        """Every model version with its backend, device and breaker state
        (sluice.v1.ModelService)."""
        return self._send(_calls.list_models(), timeout_s)

    def count_tokens(
        self, model: str, prompt: str, *, version: str = "", timeout_s: float | None = None
    ) -> TokenCount:
        """Tokens ``prompt`` takes on ``model``, and the model's context length."""
        return self._send(_calls.count_tokens(model, prompt, version), timeout_s)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        version: str = "",
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generator[GenerateChunk, None, None]:
        """Stream a generation: chunks as the model makes them, the last with
        ``finish_reason`` and ``usage``. The call starts on the first ``next()``; leaving the
        loop early (or ``close()`` on the iterator) cancels it on the server. ``timeout_s``
        bounds the whole stream."""
        call = _calls.generate(model, prompt, version, sampling)
        return self._stream(call, timeout_s)

    def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        version: str = "",
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> GenerateResult:
        """A whole generation at once: ``generate``'s chunks, joined."""
        chunks = self.generate(model, prompt, version=version, timeout_s=timeout_s, **sampling)
        return GenerateResult.join(list(chunks))
