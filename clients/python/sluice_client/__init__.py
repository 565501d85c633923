"""Typed Python client for Sluice and other Open Inference Protocol v2 gRPC servers.

    with Client("127.0.0.1:8001") as client:
        result = client.infer("simple", {"INPUT0": a, "INPUT1": b})
        result.outputs["OUTPUT0"]

``AsyncClient`` offers the same calls for asyncio.
"""

from sluice_client._channel import DEFAULT_TARGET, RetryPolicy, channel_options
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
    InferenceStats,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    RepositoryModel,
    ServerMetadata,
    TensorMetadata,
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
    "InferResult",
    "InferenceStats",
    "Internal",
    "InvalidArgument",
    "ModelMetadata",
    "ModelStatistics",
    "NotFound",
    "PermissionDenied",
    "RepositoryModel",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerMetadata",
    "SluiceClientError",
    "TensorMetadata",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "channel_options",
]
