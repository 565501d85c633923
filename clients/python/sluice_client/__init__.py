"""Typed Python client for Sluice and other Open Inference Protocol v2 gRPC servers.

    with Client("127.0.0.1:8001") as client:
        result = client.infer("simple", {"INPUT0": a, "INPUT1": b})
        result.outputs["OUTPUT0"]

        for chunk in client.generate("tiny_llama", "Once upon a time", max_new_tokens=16):
            print(chunk.text, end="")

``AsyncClient`` offers the same calls for asyncio.
"""

from sluice_client._calls import Sampling
from sluice_client._channel import DEFAULT_TARGET, RetryPolicy, TLSConfig, channel_options
from sluice_client.aio import AsyncClient
from sluice_client.client import Client
from sluice_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SluiceClientError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from sluice_client.results import (
    BatchStats,
    DurationStat,
    GenerateChunk,
    GenerateResult,
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

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "BatchStats",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DurationStat",
    "FailedPrecondition",
    "GenerateChunk",
    "GenerateResult",
    "InferResult",
    "InferenceStats",
    "Internal",
    "InvalidArgument",
    "LatencyGuardrail",
    "ModelMetadata",
    "ModelStatistics",
    "ModelVersionStatus",
    "NotFound",
    "PermissionDenied",
    "RepositoryModel",
    "ResourceExhausted",
    "RetryPolicy",
    "Sampling",
    "ServerMetadata",
    "SluiceClientError",
    "TLSConfig",
    "TensorMetadata",
    "TokenCount",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "channel_options",
]
